"""Attacks on a real daemon's RPC (issue 16, defects 1, 5, 6 and 14); after and during each, an
honest peer is still served and the victim's log has no traceback."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from attacks import rpc_flood as R
from lattice import Node, NodeConfig
from lattice.testing.daemons import start_daemon

MIB = 1 << 20


def victim(tmp_path, *args: str, config: str | None = None):
    extra = list(args)
    if config is not None:
        path = tmp_path / "victim.toml"
        path.write_text(f"[node]\n{config}\n")
        extra += ["--config", str(path)]
    return start_daemon(tmp_path, "victim", ["--listen", "/ip4/127.0.0.1/tcp/0", "--enable-bench", *extra])


@pytest.fixture
async def honest(tmp_path):
    """An honest in-process node (its own identity)."""
    cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / "honest", control=False)
    async with Node(cfg) as node:
        yield node


class HonestCalls:
    """Calls from an honest peer every ``every`` seconds while the attack runs: small ones (the fast
    lane) and ``big``-byte ones (a stream each, like any call larger than 64 KiB)."""

    def __init__(self, node, addr: str, big: int = 100 << 10, every: float = 0.02) -> None:
        self.node, self.addr, self.every = node, addr, every
        self.tensor = np.ones(big // 4, dtype=np.float32)
        self.ok = 0
        self.failed: list[str] = []

    async def run(self) -> None:
        peer = await self.node.connect(self.addr)
        i = 0
        while True:
            payload = self.tensor if i % 2 else b"x" * 16
            try:
                got = await self.node.rpc.call(peer, "lattice.bench.echo", payload, timeout=5)
                assert len(got) == len(payload)
                self.ok += 1
            except Exception as exc:
                self.failed.append(f"{type(exc).__name__}: {exc}"[:200])
            i += 1
            await trio.sleep(self.every)

    @property
    def success(self) -> float:
        return self.ok / max(1, self.ok + len(self.failed))


def assert_no_traceback(daemon) -> None:
    assert "Traceback" not in daemon.log(), daemon.log()[-3000:]


async def test_huge_payloads_are_refused_before_they_are_read(tmp_path, honest):
    """Before: three 1 GiB payloads to a missing method were read whole (the victim's RSS +3 GiB, an
    OOM kill under a 2 GiB limit); now the method and its limit are checked from the header."""
    daemon = victim(tmp_path, "--max-memory", "2GiB")
    try:
        addr = daemon.info["addrs"][0]
        calls = HonestCalls(honest, addr)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(calls.run)
            await trio.sleep(0.5)  # warm: connections and buffers of the honest peer
            missing = await R.big_payloads(addr, "no.such.method", victim_pid=daemon.proc.pid, timeout=40)
            default = await R.big_payloads(
                addr, "lattice.upload.begin", victim_pid=daemon.proc.pid, timeout=40
            )
            with trio.move_on_after(20):  # a loaded machine ends the attacks before 10 calls ran
                while calls.ok < 10:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert all(r.startswith("MethodNotFound") for r in missing["replies"]), missing
        limit = "over the limit of 16777216 bytes for lattice.upload.begin"
        assert all(limit in r for r in default["replies"]), default
        for result in (missing, default):
            assert max(result["sent_mib"]) <= 64, result  # a few windows' worth, not 1 GiB
            assert result["victim_rss_peak_mib"] - result["victim_rss_start_mib"] < 64, result
        assert calls.ok >= 10 and calls.success >= 0.99, calls.failed
        assert_no_traceback(daemon)
    finally:
        daemon.stop()


@pytest.mark.parametrize("declare", [1 << 30, 1 * MIB], ids=["1GiB", "1MiB"])
async def test_stalled_calls_are_reaped_and_honest_calls_go_on(tmp_path, honest, declare):
    """2,112 calls from 33 identities declare a tensor to a method that takes 1 GiB, send 1 KiB and
    stop. Before: they held the node's call slots (honest calls "Overloaded" until the attackers
    left). Now: each is admitted within its peer's call cap and memory budget or refused at once,
    and the admitted ones are reset after the idle timeout (2 s here)."""
    daemon = victim(tmp_path, "--max-memory", "8GiB", config="rpc_message_idle_timeout = 2.0")
    try:
        addr = daemon.info["addrs"][0]
        calls = HonestCalls(honest, addr)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(calls.run)
            await trio.sleep(0.3)
            result = await R.stalled_calls(
                addr, "lattice.bench.sink", identities=33, per_identity=64, declare=declare, hold=9.0
            )
            nursery.cancel_scope.cancel()
        assert result["opened"] >= 2000 and result["ended"] == result["opened"], result
        reaped = [t for t in result["reset_after_s"] if t >= 1.5]  # the others were refused at once
        assert reaped and max(reaped) <= 2.0 + 5.0, result  # reset by the idle reaper (slack: a busy CI)
        stats = daemon.call("metrics")["rpc"]
        assert stats["idle_reset"] >= 1 and abs(stats["idle_reset"] - len(reaped)) <= 0.05 * len(reaped), (
            stats
        )
        assert calls.ok >= 50 and calls.success >= 0.99, (calls.ok, calls.failed[:5])
        assert_no_traceback(daemon)
    finally:
        daemon.stop()


async def test_upload_squatting_does_not_block_honest_uploads(tmp_path, honest):
    """Before: two upload.begin of 4 GiB (no data, re-begun to keep them alive) took the node's 8 GiB
    of staging and every honest upload was refused."""
    daemon = victim(tmp_path)
    try:
        addr = daemon.info["addrs"][0]
        squat = await R.upload_squat(addr, identities=2, nbytes=4 << 30)
        assert all("staging quota" in r for r in squat["replies"]), squat
        peer = await honest.connect(addr)
        x = np.random.default_rng(0).standard_normal(6 << 20).astype(np.float32)  # 24 MiB, 3 chunks
        got = await honest.rpc.call(peer, "lattice.bench.sink", x, resumable=True, timeout=30)
        assert got == x.nbytes
        assert_no_traceback(daemon)
    finally:
        daemon.stop()


async def test_overflowing_shapes_are_payload_errors_and_penalized(tmp_path, honest):
    """Before: shape [2**31, 2**31, 0] passed validation, numpy raised ValueError (a 1.8 KB traceback
    in the log per message) and the peer paid nothing."""
    daemon = victim(tmp_path)
    try:
        addr = daemon.info["addrs"][0]
        result = await R.bad_shapes(addr, "lattice.bench.echo", calls=6, lane_calls=6)
        assert result["replies"][0].startswith("PayloadError") and "shape" in result["replies"][0], result
        assert result["disconnected"], result  # 10 points per malformed message: banned after 10
        bans = daemon.call("limits.bans")
        assert result["peer_id"] in bans["banned_peers"], bans
        peer = await honest.connect(addr)
        assert await honest.rpc.call(peer, "lattice.bench.echo", 7, timeout=5) == 7
        assert_no_traceback(daemon)
    finally:
        daemon.stop()
