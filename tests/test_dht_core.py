"""DHT core (sans-IO): records, wire messages, routing table, lookups, the simulator."""

from __future__ import annotations

import pytest

from lattice.dht import protocol, records, simulator
from lattice.dht.keys import key_id, peer_key
from lattice.dht.lookup import Lookup
from lattice.dht.records import Record, RecordError
from lattice.dht.routing import RoutingTable
from lattice.errors import PayloadError
from lattice.identity import KeyPair
from lattice.multiaddr import Multiaddr

NOW = 1_800_000_000.0


def test_record_roundtrip_and_verification():
    me = KeyPair.generate()
    rec = records.create(me, b"model/resnet", b"weights-v1", NOW + 600, now=NOW)
    assert rec.subkey == me.peer_id.multihash and rec.publisher_id == me.peer_id
    decoded = Record.decode(rec.encode())
    assert decoded == rec
    records.validate(decoded, NOW)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: r.__class__(**{**r.__dict__, "value": b"forged"}), "signature"),
        (lambda r: r.__class__(**{**r.__dict__, "signature": bytes(64)}), "signature"),
        (
            lambda r: r.__class__(**{**r.__dict__, "publisher": KeyPair.generate().public_key.raw}),
            "signature",
        ),
        (lambda r: r.__class__(**{**r.__dict__, "publisher": b"short"}), "publisher"),
    ],
)
def test_forged_records_are_rejected(mutate, match):
    rec = records.create(KeyPair.generate(), b"k", b"v", NOW + 60, now=NOW)
    with pytest.raises(RecordError, match=match):
        records.validate(mutate(rec), NOW)


def test_expired_oversize_and_owned_keys():
    me, other = KeyPair.generate(), KeyPair.generate()
    rec = records.create(me, b"k", b"v", NOW + 60, now=NOW)
    with pytest.raises(RecordError, match="expired"):
        records.validate(rec, NOW + 61)
    with pytest.raises(RecordError, match="over the limit"):
        records.create(me, b"k", b"x" * (records.MAX_VALUE + 1), NOW + 60, now=NOW)
    owned = b"/owned/" + str(me.peer_id).encode() + b"/config"
    records.create(me, owned, b"mine", NOW + 60, now=NOW)
    with pytest.raises(RecordError, match="owner"):
        records.create(other, owned, b"hijack", NOW + 60, now=NOW)
    with pytest.raises(RecordError, match="out of range"):
        records.create(me, b"k", b"v", NOW + records.MAX_TTL + 10, now=NOW)


def test_only_the_publisher_replaces_its_slot():
    me, other = KeyPair.generate(), KeyPair.generate()
    old = records.create(me, b"k", b"v1", NOW + 60, subkey=b"s", now=NOW)
    newer = records.create(me, b"k", b"v2", NOW + 60, subkey=b"s", now=NOW + 1)
    intruder = records.create(other, b"k", b"evil", NOW + 60, subkey=b"s", now=NOW + 2)
    assert records.may_replace(old, newer, NOW + 2)
    assert not records.may_replace(newer, old, NOW + 2)  # older version
    assert not records.may_replace(old, intruder, NOW + 2)
    assert records.may_replace(old, intruder, NOW + 61)  # the old one expired: slot is free


def test_namespace_validators():
    def only_json(record):
        if not record.value.startswith(b"{"):
            raise RecordError("not json")

    records.register_validator(b"/json/", only_json)
    me = KeyPair.generate()
    records.create(me, b"/json/a", b"{}", NOW + 60, now=NOW)
    with pytest.raises(RecordError, match="not json"):
        records.create(me, b"/json/a", b"nope", NOW + 60, now=NOW)


@pytest.mark.parametrize("garbage", [b"\xff\xff", b"\x90", b"\x97" + b"\xc0" * 7])
def test_malformed_record_bytes(garbage):
    with pytest.raises(RecordError):
        Record.decode(garbage)


def test_wire_message_roundtrip_and_malformed():
    peers = [protocol.PeerEntry(KeyPair.generate().peer_id, [Multiaddr.parse("/ip4/1.2.3.4/tcp/4001")], 1)]
    msg = protocol.Message(protocol.GET_VALUE, b"key", b"key", b"value", closer=peers)
    back = protocol.decode(protocol.encode(msg))
    assert back.type == protocol.GET_VALUE and back.key == b"key" and back.record_value == b"value"
    assert back.closer[0].peer == peers[0].peer and back.closer[0].addrs == peers[0].addrs
    for garbage in (b"\x08\x09", b"\x0a\xff\xff", b"\x42\x02\x0a\x00" * 3 + b"\x0b"):
        with pytest.raises(PayloadError):
            protocol.decode(garbage)
    with pytest.raises(PayloadError, match="too large"):
        protocol.decode(b"\x00" * (protocol.MAX_MESSAGE + 1))


def test_routing_table_buckets_and_closest():
    local = KeyPair.generate().peer_id
    table = RoutingTable(local, k=2)
    peers = [KeyPair.generate().peer_id for _ in range(64)]
    candidates = [table.add(p, now=float(i)) for i, p in enumerate(peers)]
    assert any(c is not None for c in candidates)  # some bucket filled up: eviction candidate offered
    assert all(len(b) <= 2 for b in table.buckets)
    target = key_id(b"some key")
    closest = table.closest(target, 5)
    dists = [c.key ^ target for c in closest]
    assert dists == sorted(dists) and len(closest) == 5
    victim = closest[0].peer
    for _ in range(3):
        table.failed(victim)
    assert victim not in table
    assert table.add(local) is None and local not in table


def test_lookup_converges_and_counts_hops():
    net = simulator.SimNetwork(500, k=8, seed=3)
    origin = net.ids[0]
    target = net.ids[250] ^ 1
    look = net.lookup(origin, target)
    assert look.done and look.closest(1)[0] == net.true_closest(target)
    assert 1 <= look.hops <= 6 and look.queries < 100


def test_lookup_skips_failed_peers():
    look = Lookup(target=0, seeds=[("a", 1), ("b", 2)], k=2, alpha=2)
    assert set(look.next_queries()) == {"a", "b"}
    look.on_failure("a")
    look.on_response("b", [("c", 3)])
    assert look.next_queries() == ["c"]
    look.on_response("c", [])
    assert look.done and look.closest() == ["b", "c"]


def test_simulator_meets_targets_small():
    result = simulator.run(nodes=2000, lookups=200, churn=0.3, seed=1)
    assert result.median_hops <= 11 / 2 and result.success >= 0.99


def test_keys_are_deterministic():
    me = KeyPair.from_seed(b"\x05" * 32).peer_id
    assert peer_key(me) == key_id(me.multihash) and 0 <= peer_key(me) < 1 << 256


def test_store_counts_expiry_and_limit(tmp_path):
    from lattice.dht import store as store_mod

    store = store_mod.Store(tmp_path / "s.sqlite", store_mod.StoreLimits(max_records=3))
    me = KeyPair.generate()
    for i in range(3):
        assert store.put(records.create(me, b"k%d" % i, b"v", NOW + 10 + i, now=NOW), now=NOW)
    assert store.record_count == 3
    with pytest.raises(RecordError, match="full"):
        store.put(records.create(me, b"k9", b"v", NOW + 60, now=NOW), now=NOW)
    store.expire(NOW + 11)  # records expiring at NOW+10 and NOW+11 are gone
    assert store.record_count == 1
    assert store.put(records.create(me, b"k9", b"v", NOW + 60, now=NOW), now=NOW + 11)
    store.close()


def test_verified_signature_cache_never_accepts_a_changed_record():
    rec = records.create(KeyPair.generate(), b"k", b"v", NOW + 60, now=NOW)
    records.validate(rec, NOW)  # remembered as valid
    for forged in (
        rec.__class__(**{**rec.__dict__, "value": b"v2"}),  # same signature, other content
        rec.__class__(**{**rec.__dict__, "expires_at": NOW + 61}),
        rec.__class__(**{**rec.__dict__, "signature": rec.signature[:-1] + bytes([rec.signature[-1] ^ 1])}),
    ):
        with pytest.raises(RecordError, match="signature"):
            records.validate(forged, NOW)
    records._verified.clear()
    for i in range(records.VERIFIED_CACHE):
        records._verified[i.to_bytes(32, "big")] = None
    records.validate(rec, NOW)  # verified again (not cached any more), the oldest entry dropped
    assert len(records._verified) == records.VERIFIED_CACHE and bytes(32) not in records._verified


def test_routing_closest_matches_a_full_sort():
    table = RoutingTable(KeyPair.generate().peer_id, k=20)
    for _ in range(40):
        table.add(KeyPair.generate().peer_id)
    contacts = table.contacts()
    assert len(table) == len(contacts)
    target = key_id(b"t")
    assert table.closest(target) == sorted(contacts, key=lambda c: c.key ^ target)[:20]
    skip = {contacts[0].peer}
    assert all(c.peer not in skip for c in table.closest(target, 50, exclude=skip))
    table.remove(contacts[0].peer)
    assert len(table) == len(contacts) - 1 and table.get(contacts[0].peer) is None


def test_created_records_carry_a_real_signature():
    """create() skips verifying what it just signed; a node without that memory still accepts it."""
    rec = records.create(KeyPair.generate(), b"k", b"v", NOW + 60, now=NOW)
    records._verified.clear()
    records._keys.clear()
    records.validate(Record.decode(rec.encode()), NOW)
    with pytest.raises(RecordError, match="owner"):
        records.create(KeyPair.generate(), b"/owned/someone-else/x", b"v", NOW + 60, now=NOW)


def test_store_writes_behind_in_one_commit_and_keeps_failed_commits_pending(tmp_path):
    import sqlite3
    import time

    from lattice.dht.store import Store

    kp = KeyPair.generate()
    path = tmp_path / "s.sqlite"
    store = Store(path)
    recs = [records.create(kp, f"k/{i}".encode(), b"v", time.time() + 600) for i in range(30)]
    for r in recs:
        assert store.put(r, defer=True)
    assert store.pending == 30 and store.record_count == 30  # served from memory at once
    store._db.execute("PRAGMA query_only=ON")  # the disk refuses: nothing may be dropped
    with pytest.raises(sqlite3.Error):
        store.flush()
    assert store.pending == 30 and store.write_errors == 1
    store._db.execute("PRAGMA query_only=OFF")
    store.flush()  # the retry commits every pending record
    assert store.pending == 0
    newer = records.create(kp, b"k/0", b"v2", time.time() + 600)
    assert store.put(newer, defer=True) and store.pending == 1  # a slot is written once per batch
    store.close()  # a stop commits what is pending
    again = Store(path)
    assert again.record_count == 30 and again.get(b"k/0")[0].value == b"v2"
    again.close()
