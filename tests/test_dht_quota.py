"""The DHT store's quotas (issue 16, defects 8-10) and the peer-id subkey rule, without a network:
byte quotas per publisher, per sender IP prefix and for the store, replacement by a newer version,
fair eviction when full, provider caps, and refusal at put, on receipt and when loaded from sqlite."""

from __future__ import annotations

import sqlite3
import time

import pytest

from lattice.dht import records
from lattice.dht.records import Record, RecordError
from lattice.dht.store import (
    QuotaExceeded,
    Store,
    StoreLimits,
    Usage,
    over_quota,
    provider_to_evict,
    record_size,
)
from lattice.errors import ConfigError
from lattice.identity import KeyPair
from lattice.transport.limits import Limits, PeerLimits, ip_prefix

NOW = time.time()  # taken at import: records live a day, so a long test run never sees them expire
TTL = 24 * 3600.0
SIZE = record_size(records.create(KeyPair.generate(), b"k/0", b"x" * 1000, NOW + 60, now=NOW))


def _rec(kp: KeyPair, key: bytes, value: bytes = b"x" * 1000, now: float = NOW) -> Record:
    return records.create(kp, key, value, NOW + TTL, now=now)


def _forged_subkey(kp: KeyPair, subkey: bytes, key: bytes = b"mesh/m", ahead: float = 0.0) -> Record:
    """A record signed by ``kp`` in another peer's slot: what create() refuses to make."""
    at = NOW + ahead
    signed = records.signed_bytes(key, subkey, b"squat", at, NOW + TTL)
    return Record(
        key, subkey, b"squat", kp.public_key.raw, at, NOW + TTL, kp.sign_for(records.SIGN_CONTEXT, signed)
    )


def test_quota_arithmetic():
    assert not over_quota(used=900, delta=100, quota=1000)  # exactly full is within the quota
    assert over_quota(used=901, delta=100, quota=1000)
    assert not over_quota(used=5000, delta=0, quota=1000)  # a replacement that does not grow ...
    assert not over_quota(used=5000, delta=-10, quota=1000)  # ... or shrinks is never refused
    assert record_size(_rec(KeyPair.generate(), b"abc", b"v" * 10)) == 3 + 38 + 10 + 512
    with pytest.raises(ConfigError, match="max_bytes"):
        StoreLimits(max_bytes=0)


def test_usage_keeps_the_largest_group_at_hand():
    usage = Usage()
    for group, amount in (("a", 4), ("b", 9), ("c", 7)):
        usage.add(group, amount)
    assert usage.largest() == ("b", 9)
    usage.add("b", -4)  # stale heap entries are skipped
    assert usage.largest() == ("c", 7)
    usage.add("c", -7)
    assert usage.largest() == ("b", 5) and "c" not in usage.of
    for _ in range(1000):  # the lazy heap is rebuilt, not grown without bound
        usage.add("a", 1)
        usage.add("a", -1)
    assert len(usage._heap) <= 4 * len(usage.of) + 64


def test_publisher_quota_and_replacement_count_the_difference():
    store = Store(limits=StoreLimits(max_bytes_per_publisher=3 * SIZE))
    me = KeyPair.generate()
    for i in range(3):
        assert store.put(_rec(me, b"k/%d" % i), NOW)
    assert store.publisher_bytes(me.public_key.raw) == 3 * SIZE == store.stored_bytes
    with pytest.raises(QuotaExceeded, match="publisher") as refused:
        store.put(_rec(me, b"k/3"), NOW)
    assert refused.value.scope == "publisher" and store.record_count == 3
    assert store.get(b"k/3", NOW) == []
    # a newer version of a held record: only the difference counts
    assert store.put(_rec(me, b"k/0", b"y" * 1000, now=NOW + 1), NOW + 1)  # same size: fits
    with pytest.raises(QuotaExceeded):
        store.put(_rec(me, b"k/0", b"y" * 1001, now=NOW + 2), NOW + 2)  # one byte more: does not
    assert store.put(_rec(me, b"k/0", b"small", now=NOW + 3), NOW + 3)  # smaller: always
    assert store.stored_bytes == 2 * SIZE + SIZE - 995
    assert store.put(_rec(me, b"k/3", b"x" * 400), NOW + 3)  # the room it freed is usable again
    other = KeyPair.generate()
    assert store.put(_rec(other, b"k/9"), NOW + 3)  # another publisher has its own quota


def test_prefix_quota_counts_what_peers_of_one_prefix_sent():
    store = Store(limits=StoreLimits(max_bytes_per_prefix=2 * SIZE))
    sybils = [KeyPair.generate() for _ in range(3)]
    assert store.put(_rec(sybils[0], b"k/a"), NOW, prefix="203.0.113.0/24")
    assert store.put(_rec(sybils[1], b"k/b"), NOW, prefix="203.0.113.0/24")
    with pytest.raises(QuotaExceeded, match=r"203\.0\.113\.0/24") as refused:
        store.put(_rec(sybils[2], b"k/c"), NOW, prefix="203.0.113.0/24")
    assert refused.value.scope == "prefix" and store.prefix_bytes("203.0.113.0/24") == 2 * SIZE
    assert store.put(_rec(sybils[2], b"k/c"), NOW, prefix="198.51.100.0/24")  # another prefix
    assert store.put(_rec(KeyPair.generate(), b"k/d"), NOW, prefix=None)  # exempt or local: not counted
    # a newer version sent from the same prefix replaces its old charge
    assert store.put(_rec(sybils[0], b"k/a", b"z" * 1000, now=NOW + 1), NOW + 1, prefix="203.0.113.0/24")
    store.expire(NOW + TTL + 1)
    assert store.prefix_bytes("203.0.113.0/24") == 0 and store.stored_bytes == 0


def test_a_full_store_evicts_the_largest_publisher_for_a_smaller_one(tmp_path):
    store = Store(tmp_path / "s.sqlite", StoreLimits(max_bytes=4 * SIZE))
    big, small = KeyPair.generate(), KeyPair.generate()
    for i in range(4):
        assert store.put(_rec(big, b"b/%d" % i), NOW)
    assert store.put(_rec(small, b"s/0"), NOW)  # evicts one of big's (its oldest)
    assert store.evicted == 1 and store.get(b"b/0", NOW) == [] and store.stored_bytes <= 4 * SIZE
    with pytest.raises(QuotaExceeded, match="full") as refused:
        store.put(_rec(big, b"b/9"), NOW)  # the largest publisher makes no room for itself
    assert refused.value.scope == "store"
    assert store.put(_rec(small, b"s/1"), NOW)  # evicts again: 2 against big's 2 after
    with pytest.raises(QuotaExceeded):
        store.put(_rec(small, b"s/2"), NOW)  # 3 against big's 2 would not be fair: refused
    assert store.evicted == 2 and store.record_count == 4 and store.stored_bytes == 4 * SIZE
    store.close()
    db = sqlite3.connect(str(tmp_path / "s.sqlite"))
    keys = sorted(k for (k,) in db.execute("SELECT key FROM records"))
    db.close()
    assert keys == [b"b/2", b"b/3", b"s/0", b"s/1"]  # evictions are deleted on disk too
    reloaded = Store(tmp_path / "s.sqlite", StoreLimits(max_bytes=3 * SIZE))  # quota lowered: fits 3
    assert reloaded.record_count == 3 and reloaded.stored_bytes == 3 * SIZE
    reloaded.close()


def test_a_subkey_that_is_a_peer_id_must_be_signed_by_that_peer(tmp_path):
    owner, squatter = KeyPair.generate(), KeyPair.generate()
    with pytest.raises(RecordError, match="subkey"):
        records.create(squatter, b"mesh/m", b"v", NOW + 60, subkey=owner.peer_id.multihash, now=NOW)
    with pytest.raises(RecordError, match="subkey"):  # the base58 text of a peer id names it too
        records.create(squatter, b"mesh/m", b"v", NOW + 60, subkey=str(owner.peer_id).encode(), now=NOW)
    for subkey in (owner.peer_id.multihash, str(owner.peer_id).encode(), b"alice", b""):
        records.create(owner, b"mesh/m", b"v", NOW + 60, subkey=subkey, now=NOW)  # own id, or not an id
    squat = _forged_subkey(squatter, owner.peer_id.multihash, ahead=60.0)
    with pytest.raises(RecordError, match="subkey"):  # on receipt: every hop validates
        records.validate(Record.decode(squat.encode()), NOW)
    store = Store(tmp_path / "s.sqlite")
    with pytest.raises(RecordError, match="subkey"):
        store.put(squat, NOW)
    assert store.put(_rec(owner, b"mesh/m"), NOW)  # the owner's slot stays its own
    store.close()
    # a squatted row written to disk by an older version is not loaded, and is deleted
    old = _forged_subkey(squatter, owner.peer_id.multihash, key=b"mesh/x")
    db = sqlite3.connect(str(tmp_path / "s.sqlite"))
    db.execute("INSERT INTO records VALUES (?, ?, ?, ?)", (old.key, old.subkey, old.encode(), NOW + TTL))
    db.commit()
    db.close()
    store = Store(tmp_path / "s.sqlite")
    assert store.get(b"mesh/x") == [] and store.record_count == 1
    store.close()
    db = sqlite3.connect(str(tmp_path / "s.sqlite"))
    assert db.execute("SELECT count(*) FROM records WHERE key = ?", (b"mesh/x",)).fetchone()[0] == 0
    db.close()


def test_providers_per_prefix_on_a_key_cannot_crowd_out_the_others():
    store = Store(limits=StoreLimits(max_providers_per_key=8, max_providers_per_prefix_per_key=4))
    sybils = [KeyPair.generate().peer_id for _ in range(64)]
    refused = 0
    for peer in sybils:  # 64 sybils of one /24 announce the relay key
        try:
            store.add_provider(b"/lattice/relays", peer, [b"addr"], NOW, prefix="203.0.113.0/24")
        except QuotaExceeded as exc:
            assert exc.scope == "provider_prefix_key"
            refused += 1
    assert refused == 60 and len(store.get_providers(b"/lattice/relays", NOW)) == 4
    honest = [KeyPair.generate().peer_id for _ in range(4)]
    for i, peer in enumerate(honest):
        store.add_provider(b"/lattice/relays", peer, [b"addr"], NOW, prefix=f"198.51.{i}.0/24")
    listed = {p for p, _ in store.get_providers(b"/lattice/relays", NOW)}
    assert set(honest) <= listed and len(listed) == 8
    # the key is full: a newcomer from a fresh prefix takes a slot from the most-listed prefix
    newcomer = KeyPair.generate().peer_id
    store.add_provider(b"/lattice/relays", newcomer, [b"addr"], NOW, prefix="192.0.2.0/24")
    listed = {p for p, _ in store.get_providers(b"/lattice/relays", NOW)}
    assert newcomer in listed and set(honest) <= listed and len(listed & set(sybils)) == 3
    store.add_provider(b"/lattice/relays", newcomer, [b"addr2"], NOW, prefix="192.0.2.0/24")  # refresh
    assert store.provider_count == 8


def test_provider_caps_per_peer_per_prefix_and_in_all():
    store = Store(
        limits=StoreLimits(max_provider_keys_per_peer=3, max_providers_per_prefix=5, max_providers=9)
    )
    peer = KeyPair.generate().peer_id
    for i in range(3):
        store.add_provider(b"k%d" % i, peer, [], NOW)
    with pytest.raises(QuotaExceeded) as refused:
        store.add_provider(b"k3", peer, [], NOW)
    assert refused.value.scope == "provider_peer"
    for i in range(5):
        store.add_provider(b"p%d" % i, KeyPair.generate().peer_id, [], NOW, prefix="203.0.113.0/24")
    with pytest.raises(QuotaExceeded) as refused:
        store.add_provider(b"p9", KeyPair.generate().peer_id, [], NOW, prefix="203.0.113.0/24")
    assert refused.value.scope == "provider_prefix" and store.provider_count == 8
    store.add_provider(b"q", KeyPair.generate().peer_id, [], NOW)  # the 9th entry
    with pytest.raises(QuotaExceeded) as refused:
        store.add_provider(b"q", KeyPair.generate().peer_id, [], NOW)
    assert refused.value.scope == "providers"
    store.expire(NOW + 2 * 24 * 3600)  # expired entries release every count
    assert store.provider_count == 0
    store.add_provider(b"k3", peer, [], NOW + 2 * 24 * 3600)


def test_provider_eviction_picks_the_most_listed_group():
    a, b, c = (KeyPair.generate().peer_id for _ in range(3))
    entries = {a: ([], NOW + 10, "p1"), b: ([], NOW + 5, "p1"), c: ([], NOW + 1, "p2")}
    assert provider_to_evict(entries, "p3") == b  # p1 is listed twice: its soonest-expiring entry
    assert provider_to_evict(entries, "p1") is None  # p1 itself gains nothing from the swap
    assert provider_to_evict({c: ([], NOW + 1, None)}, KeyPair.generate().peer_id) == c  # exempt peers


def test_ip_prefixes_and_exempt_addresses():
    assert ip_prefix("203.0.113.77") == "203.0.113.0/24"
    assert ip_prefix("2001:db8:1:2::5") == "2001:db8:1::/48"
    assert ip_prefix("::ffff:198.51.100.9") == "198.51.100.0/24"  # an IPv4-mapped address is IPv4
    limits = PeerLimits(Limits())
    assert limits.prefix_of("127.0.0.1") is None and limits.prefix_of(None) is None
    assert limits.prefix_of("203.0.113.77") == "203.0.113.0/24"


def test_expired_records_release_their_charge_and_leave_the_disk(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    me = KeyPair.generate()
    assert store.put(records.create(me, b"k/1", b"v", NOW + 10, now=NOW), NOW)
    assert store.put(_rec(me, b"k/2"), NOW)
    store.expire(NOW + 11)
    assert store.publisher_bytes(me.public_key.raw) == store.stored_bytes == SIZE
    store.flush()  # deleted by primary key with the next commit
    db = sqlite3.connect(str(tmp_path / "s.sqlite"))
    assert [k for (k,) in db.execute("SELECT key FROM records")] == [b"k/2"]
    db.close()
    store.close()
