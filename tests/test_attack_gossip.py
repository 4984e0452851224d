"""Gossipsub floods against a real daemon: its memory stays bounded and a document shared with an
honest daemon still replicates."""

from __future__ import annotations

import pytest

from attacks.gossip_flood import gossip_flood
from lattice.testing.daemons import start_daemon, wait_for

TOPIC = "/lattice/crdt/shared"  # what a daemon subscribes to once it opens document "shared"


@pytest.fixture
def pair(tmp_path):
    victim = start_daemon(tmp_path, "victim", ["--listen", "/ip4/127.0.0.1/tcp/0"])
    honest = start_daemon(
        tmp_path, "honest", ["--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", victim.info["addrs"][0]]
    )
    yield victim, honest
    honest.stop()
    victim.stop()


async def test_a_gossip_flood_neither_grows_memory_nor_stops_replication(pair):
    victim, honest = pair
    for daemon in pair:
        daemon.call("crdt.open", doc="shared")
    result = await gossip_flood(
        victim.info["addrs"][0], TOPIC, rpcs=300, seconds=4.0, victim_pid=victim.proc.pid
    )
    assert result["rpcs_sent"] >= 100, result
    # 300 RPCs named 1.2 M topics to prune and 300 k to subscribe to: none of it may be kept
    assert result["victim_rss_after_mib"] - result["victim_rss_before_mib"] < 40, result
    honest.call("crdt.set", doc="shared", key="after", value="the flood")
    wait_for(lambda: victim.call("crdt.get", doc="shared").get("after") == "the flood", 10, "replication")
    assert "Traceback" not in victim.log()
