"""Hostile peers of the content service against real daemons (issue 20): a provider that serves
corrupt, oversized or unasked-for chunks; requesters that flood a provider with requests they never
read, or with malformed ones. Honest peers are still served throughout."""

from __future__ import annotations

import os

import pytest
import trio

from attacks import content as attack
from lattice.testing.daemons import start_daemon, wait_for

LOOPBACK = ["--listen", "/ip4/127.0.0.1/tcp/0"]
MIB = 1 << 20


@pytest.fixture
def daemons(tmp_path):
    """A provider holding a 16 MiB blob (1 MiB chunks), and a fetcher connected to it."""
    yield from _pair(tmp_path, LOOPBACK)


@pytest.fixture
def slow_provider_daemons(tmp_path):
    """The same with the provider serving 4 MiB/s per peer: a rogue beside it delivers its chunks
    first, so the fetcher checks them (a bad copy that loses the race to a good one is never
    checked, and its sender never caught: nothing of it is kept either way)."""
    config = tmp_path / "slow.toml"
    config.write_text("[node.content]\nserve_peer_rate = 4194304\n")
    yield from _pair(tmp_path, [*LOOPBACK, "--config", str(config)])


def _pair(tmp_path, provider_args: list[str]):
    started = []
    try:
        provider = start_daemon(tmp_path, "provider", provider_args)
        started.append(provider)
        fetcher = start_daemon(tmp_path, "fetcher", [*LOOPBACK, "--bootstrap", provider.info["addrs"][0]])
        started.append(fetcher)
        blob = tmp_path / "blob.bin"
        blob.write_bytes(os.urandom(16 * MIB))
        added = provider.call("content.add", path=str(blob))
        yield provider, fetcher, added["cid"], blob.read_bytes()
    finally:
        for daemon in started:
            daemon.stop()


def fetch(daemon, cid: str, output, providers: list[str]) -> dict:
    with daemon.client() as client:
        return list(client.stream("content.get", cid=cid, output=str(output), providers=providers))[-1]


@pytest.mark.parametrize("mode", ["corrupt", "oversized", "unasked"])
async def test_a_rogue_provider_is_dropped_and_the_fetch_is_bitwise_right(
    tmp_path, slow_provider_daemons, mode
):
    provider, fetcher, cid, data = slow_provider_daemons
    out = tmp_path / "out.bin"
    got = await attack.rogue_provider(
        fetcher.info["control"], provider.info["addrs"][0], cid, mode, str(out), tmp_path / "rogue"
    )
    assert got["victim"].get("done") is True, (got, fetcher.log()[-3000:])
    assert got["served"]["chunks"] >= 1, got  # the victim did ask the rogue
    assert out.read_bytes() == data
    status = fetcher.call("content.status")
    reason = status["bad_providers"][got["rogue"]]
    expected = {
        "corrupt": "does not match its hash",
        "oversized": "over the limit",
        "unasked": "not asked for",
    }
    assert expected[mode] in reason, reason
    assert list(status["bad_providers"]) == [got["rogue"]]  # the honest provider is not blamed
    assert "Traceback" not in fetcher.log()


async def test_stalled_requests_hold_little_and_an_honest_fetch_still_completes(tmp_path, daemons):
    provider, fetcher, cid, data = daemons
    target = provider.info["addrs"][0]
    warm = tmp_path / "warm.bin"  # one chunk served first: the provider loads numpy on its first
    warm.write_bytes(os.urandom(MIB))  # chunk (lattice._lazy), which is not what the attack costs
    small = provider.call("content.add", path=str(warm))["cid"]
    assert fetch(fetcher, small, tmp_path / "warm.out", [target])["done"] is True
    out = tmp_path / "honest.bin"
    result: dict = {}

    async def honest() -> None:
        await trio.sleep(1.0)  # while the attackers hold their requests
        started = trio.current_time()
        result["get"] = await trio.to_thread.run_sync(fetch, fetcher, cid, out, [target])
        result["seconds"] = trio.current_time() - started

    async with trio.open_nursery() as nursery:
        nursery.start_soon(honest)
        flood = await attack.stalled_requests(
            target, cid, chunks=16, identities=4, per_identity=48, hold=4.0, victim_pid=provider.proc.pid
        )
    assert result["get"]["done"] is True and out.read_bytes() == data, result
    assert result["seconds"] < 3.0, result
    # each identity got its 4 requests (serve_peer_requests); the rest were refused before any read
    assert flood["accepted"] == 16 and flood["refused"] == 4 * 48 - 16, flood
    grew = flood["victim_rss_peak_mib"] - flood["victim_rss_start_mib"]
    assert grew < 48, flood  # 192 accepted requests held ~1 MiB each before
    # the attackers left: every serving slot came back
    wait_for(lambda: provider.call("content.status")["serving"]["active"] == 0, 5, "slots to be released")
    assert "Traceback" not in provider.log()


async def test_malformed_requests_get_their_sender_cut_off(tmp_path, daemons):
    provider, fetcher, cid, data = daemons
    got = await attack.malformed_requests(provider.info["addrs"][0], cid, count=60)
    assert got["replies"].get("PayloadError", 0) >= 1, got
    assert got["cut_off_after"] is not None, got  # banned for misbehaviour
    status = provider.call("content.status")
    assert status["serving"]["malformed"] >= 5, status
    out = tmp_path / "honest.bin"
    assert fetch(fetcher, cid, out, [provider.info["addrs"][0]])["done"] is True
    assert out.read_bytes() == data
    assert "Traceback" not in provider.log()
