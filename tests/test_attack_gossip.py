"""Gossipsub floods against a real daemon: its memory stays bounded and a document shared with an
honest daemon still replicates."""

from __future__ import annotations

import time

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
    started = time.monotonic()
    result = await gossip_flood(
        victim.info["addrs"][0], TOPIC, rpcs=60, seconds=1.0, victim_pid=victim.proc.pid
    )
    assert result["rpcs_sent"] == 60 or result["reset_by_victim"], result
    # 60 RPCs of ~300 KB named 240 k topics to prune and 60 k to subscribe to: none of it is kept
    assert result["victim_rss_after_mib"] - result["victim_rss_before_mib"] < 40, result
    # and the victim read them at its per-peer pace (2 MiB/s after an 8 MiB burst), not at once
    assert result["reset_by_victim"] or time.monotonic() - started > 3.0
    honest.call("crdt.set", doc="shared", key="after", value="the flood")
    wait_for(lambda: victim.call("crdt.get", doc="shared").get("after") == "the flood", 10, "replication")
    assert "Traceback" not in victim.log()
