"""DHT replies naming made-up peers against a real daemon (issue 16, defect 13): the peer store
stays at its cap, the daemon's memory stays put, and an honest peer (connected, in the routing
table) is never evicted and still served."""

from __future__ import annotations

import pytest

from attacks import peer_flood
from lattice.testing.daemons import start_daemon, wait_for

LOOPBACK = ["--listen", "/ip4/127.0.0.1/tcp/0"]


def start_pair(tmp_path, victim_args=()):
    victim = start_daemon(tmp_path, "victim", [*LOOPBACK, *victim_args])
    started = [victim]
    try:
        started.append(start_daemon(tmp_path, "honest", [*LOOPBACK, "--bootstrap", victim.info["addrs"][0]]))
        wait_for(lambda: victim.call("dht.status")["routing_table"] >= 1, 10, "the DHTs to meet")
    except BaseException:
        victim.stop()
        raise
    return started


def assert_honest_served(victim, honest) -> None:
    assert honest.call("dht.put", key="honest/after", value=b"v") >= 1
    assert [e["value"] for e in victim.call("dht.get", key="honest/after")] == [b"v"]
    assert honest.peer_id in {row["peer_id"] for row in victim.call("peers")}
    assert "Traceback" not in victim.log()


async def test_fake_peers_in_dht_replies_keep_the_peer_store_at_its_cap(tmp_path):
    """20,000 made-up peers against a store of 2,000. Before: every one of them stayed."""
    config = tmp_path / "victim.toml"
    config.write_text("[node.resources]\npeerstore_peers = 2000\n")
    victim, honest = start_pair(tmp_path, ["--config", str(config)])
    try:
        result = await peer_flood.fake_peer_replies(victim.info["addrs"][0], victim.info["control"], 20_000)
        assert result["named"] >= 20_000, result
        store = victim.call("status")["peerstore"]
        assert store["peers"] <= store["max_peers"] == 2000, store
        assert store["evicted"] >= 16_000, store
        assert_honest_served(victim, honest)
    finally:
        for daemon in (honest, victim):
            daemon.stop()


@pytest.mark.slow
async def test_100k_fake_peers_leave_the_daemons_memory_bounded(tmp_path):
    """The default cap (10,000) against 100,000 made-up peers. Before: RSS 59 -> 145 MiB (+86) and
    100,000 entries; now +17 MiB at the cap."""
    victim, honest = start_pair(tmp_path)
    try:
        result = await peer_flood.fake_peer_replies(
            victim.info["addrs"][0], victim.info["control"], 100_000, victim_pid=victim.proc.pid
        )
        assert result["named"] >= 100_000, result
        store = victim.call("status")["peerstore"]
        assert store["peers"] <= store["max_peers"] == 10_000, store
        assert result["victim_rss_peak_mib"] - result["victim_rss_start_mib"] < 40, result
        assert_honest_served(victim, honest)
    finally:
        for daemon in (honest, victim):
            daemon.stop()
