"""Hostile DHT writers against a real daemon (issue 16, defects 8 and 9): an identity filling the
record store, then sybils, then a subkey squatter; an honest daemon is still served throughout.

Caveat: on loopback every peer has the same (exempt) IP, so the quota per IP prefix is not in play
here (unit tests in test_dht_quota.py cover it); the honest peer differs from the attacker by its
publisher identity, and the store's fair eviction is what keeps its records.
"""

from __future__ import annotations

import pytest

from attacks import dht_fill
from lattice.testing.daemons import start_daemon, wait_for

LOOPBACK = ["--listen", "/ip4/127.0.0.1/tcp/0"]
QUOTA = 1 << 20  # the victim's store: 1 MiB (15 records of 64 KiB)
PER_PUBLISHER = 256 << 10  # 3 records of 64 KiB


@pytest.fixture
def daemons(tmp_path):
    """A victim with a small store quota, and an honest daemon joined through it."""
    config = tmp_path / "victim.toml"
    config.write_text(f"[node]\ndht_max_bytes = {QUOTA}\ndht_max_bytes_per_publisher = {PER_PUBLISHER}\n")
    victim = start_daemon(tmp_path, "victim", [*LOOPBACK, "--config", str(config)])
    started = [victim]
    try:
        started.append(start_daemon(tmp_path, "honest", [*LOOPBACK, "--bootstrap", victim.info["addrs"][0]]))
        wait_for(
            lambda: all(d.call("dht.status")["routing_table"] >= 1 for d in started), 10, "the DHTs to meet"
        )
        yield started
    finally:
        for daemon in started:
            daemon.stop()


def _values(daemon, key: str) -> list[tuple[str, bytes]]:
    return [(e["publisher"], e["value"]) for e in daemon.call("dht.get", key=key, latest=True)]


async def test_an_identity_and_its_sybils_cannot_fill_the_store_and_honest_records_stay(daemons):
    victim, honest = daemons
    target = victim.info["addrs"][0]
    assert honest.call("dht.put", key="honest/before", value=b"early") == 2  # the victim holds it

    one = await dht_fill.fill(target, identities=1, records_per_identity=200)
    assert one["stored"] == 3, one  # its publisher quota, then refusals
    assert one["cut_off"] == 1 and one["sent"] < 200, one  # kept writing after refusals: banned
    status = victim.call("dht.status")
    assert status["quota_refused_publisher"] >= one["refused"] > 0, status

    sybils = await dht_fill.fill(target, identities=24, records_per_identity=4)
    status = victim.call("dht.status")
    assert sybils["stored"] >= 12 and sybils["cut_off"] == 0, sybils  # the store filled up ...
    assert QUOTA - 2 * (64 << 10) < status["stored_bytes"] <= QUOTA == status["max_bytes"], status
    assert status["evicted"] > 0, status  # ... and the largest holders made room (the first identity)

    # not the small honest writer: its old record is still there, and a new one still fits
    assert honest.call("dht.put", key="honest/after", value=b"late") == 2
    assert _values(victim, "honest/before") == [(honest.peer_id, b"early")]
    assert _values(victim, "honest/after") == [(honest.peer_id, b"late")]
    assert victim.call("dht.status")["stored_bytes"] <= QUOTA
    assert "Traceback" not in victim.log()


async def test_a_squatter_in_another_peers_subkey_is_refused(daemons):
    victim, honest = daemons
    squat = await dht_fill.squat(victim.info["addrs"][0], honest.peer_id, b"mesh/tiny-model")
    assert squat["sent"] == 1 and squat["stored"] == 0 and not squat["cut_off"], squat
    assert victim.call("dht.status")["rejected_records"] >= 1
    # the owner of the slot publishes later (older timestamp than the squat) and is still stored
    assert honest.call("dht.put", key="mesh/tiny-model", value=b"honest announcement") == 2
    assert _values(victim, "mesh/tiny-model") == [(honest.peer_id, b"honest announcement")]
    assert "Traceback" not in victim.log()
