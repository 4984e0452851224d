"""The optimistic store on real nodes over loopback: PUT_VALUE goes to the routing table's k closest
while the lookup runs, and the count a put returns stays honest (acks from the final k closest only)."""

from __future__ import annotations

import time

import pytest

from conftest import dht_swarm
from lattice import Node
from lattice.dht import protocol, records
from lattice.dht.keys import key_id, peer_key
from lattice.dht.routing import RoutingTable
from lattice.identity import KeyPair


async def _swarm(tmp_path, nursery, count: int, k: int) -> list[Node]:
    """``count`` nodes with replication factor ``k``, joined through the first; tables filled."""
    return await dht_swarm(tmp_path, nursery, count, k)


def _record_requests(nodes: list[Node], monkeypatch, like_go: bool = False) -> list[tuple[int, bytes]]:
    """(type, key) of every request the nodes answer from now on; ``like_go``: they ignore WANT_CLOSER
    (field 100 is unknown to go-libp2p-kad-dht, which echoes a PUT_VALUE without peers)."""
    seen: list[tuple[int, bytes]] = []
    for node in nodes:

        def answer(req, requester, original=node.dht._answer):
            seen.append((req.type, req.key))
            if like_go:
                req.want_closer = False
            return original(req, requester)

        monkeypatch.setattr(node.dht, "_answer", answer)
    return seen


def _distance(node: Node, key: bytes) -> int:
    return peer_key(node.peer_id) ^ key_id(key)


async def test_small_swarm_stores_optimistically_and_counts_every_replica(tmp_path, nursery, monkeypatch):
    nodes = await _swarm(tmp_path, nursery, 6, k=20)
    putter = nodes[2]
    seen = _record_requests([n for n in nodes if n is not putter], monkeypatch)
    assert await putter.dht.put("opt/1", b"v", ttl=600) == 6  # fewer nodes than k: all of them
    assert sorted(t for t, key in seen if key == b"opt/1") == [protocol.PUT_VALUE] * 5  # no FIND_NODE
    stats = putter.dht.counters
    assert stats["put_sent_early"] == 5 and stats["put_sent_late"] == 0
    # the lookup's 3 first queries were answered by the PUT_VALUE replies of those peers (WANT_CLOSER)
    assert stats["put_lookup_queries"] == 3 and stats["put_queries_answered_by_put"] == 3
    assert all([e.value for e in n.dht.store.get(b"opt/1")] == [b"v"] for n in nodes)


async def test_peers_without_the_want_closer_extension_get_a_find_node(tmp_path, nursery, monkeypatch):
    """A go/rust peer ignores WANT_CLOSER and echoes the PUT_VALUE without peers: the lookup then sends
    that peer an ordinary FIND_NODE, and the put's count is the same."""
    nodes = await _swarm(tmp_path, nursery, 6, k=20)
    putter, others = nodes[0], nodes[1:]
    seen = _record_requests(others, monkeypatch, like_go=True)
    assert await putter.dht.put("opt/go", b"v", ttl=600) == 6
    assert putter.dht.counters["put_queries_answered_by_put"] == 0
    mine = [t for t, key in seen if key == b"opt/go"]
    assert mine.count(protocol.PUT_VALUE) == 5 and mine.count(protocol.FIND_NODE) == 3


async def test_optimistic_sends_outside_the_final_k_closest_are_not_counted(tmp_path, nursery, monkeypatch):
    """The putter's table lacks the two peers closest to the key (it never heard of them): the early
    PUT_VALUE goes to the wrong peers, the lookup finds the right ones, and only acks from the final k
    closest count."""
    k = 3
    nodes = await _swarm(tmp_path, nursery, 6, k=k)
    putter, others = nodes[0], nodes[1:]
    for i in range(500):  # a key for which the table without its 2 closest peers sends some early in vain
        key = f"far/{i}".encode()
        ranked = sorted(others, key=lambda n, key=key: _distance(n, key))
        hidden = ranked[:2]
        table = RoutingTable(putter.peer_id, 20)  # roomy buckets: it looks complete
        for c in putter.dht.table.contacts():
            if c.peer not in {h.peer_id for h in hidden}:
                table.add(c.peer, c.addrs)
        saved, putter.dht.table = putter.dht.table, table
        early = putter.dht._optimistic_targets(key_id(key))
        putter.dht.table = saved
        if set(early) - {n.peer_id for n in ranked[:k]}:  # some early sends will be unneeded
            break
    else:
        pytest.fail("no key found for which the reduced table looks complete")
    # the table stays as it is during the put (no traffic adds a peer back); the lookup learns the
    # hidden peers from the others' answers
    monkeypatch.setattr(putter.dht, "_admitted", lambda peer: False)
    putter.dht.table = table
    lookups = []
    lookup = putter.dht._lookup

    async def keep(*args, **kwargs):
        lookups.append(await lookup(*args, **kwargs))
        return lookups[-1]

    monkeypatch.setattr(putter.dht, "_lookup", keep)
    count = await putter.dht.put(key, b"v", ttl=600)
    final = set(lookups[0].closest_known(k))
    assert final == {n.peer_id for n in ranked[:k]}  # the lookup found the 2 hidden peers
    holders = {n.peer_id for n in others if n.dht.store.get(key)}
    far = max(_distance(n, key) for n in ranked[:k])
    me = _distance(putter, key) <= far  # the putter itself is among the k closest
    assert count == len(final & holders) + me == k + me
    stats = putter.dht.counters
    assert stats["put_sent_early"] == len(early)
    assert stats["put_sent_during_lookup"] + stats["put_sent_late"] == len(final - set(early))
    assert {h.peer_id for h in hidden} <= final - set(early)  # the hidden peers got it once found
    assert stats["put_early_unneeded"] == len(set(early) - final) > 0
    assert set(early) <= holders  # sent early and stored, but not counted: not among the final k


async def test_records_the_replicas_refuse_count_zero(tmp_path, nursery):
    nodes = await _swarm(tmp_path, nursery, 5, k=20)
    putter = nodes[1]
    keypair = putter.host.keypair
    now = time.time()
    older = records.create(keypair, b"slot", b"old", now + 600, now=now - 10)
    newer = records.create(keypair, b"slot", b"new", now + 600, now=now - 5)
    assert await putter.dht._replicate(newer) == 5
    assert await putter.dht._replicate(older) == 0  # every replica (and the putter) keeps the newer one
    assert all([e.value for e in n.dht.store.get(b"slot")] == [b"new"] for n in nodes)


def test_complete_up_to_turns_false_once_a_bucket_fills():
    local = KeyPair.generate().peer_id
    table = RoutingTable(local, k=2)
    assert table.complete_up_to(255)
    by_bucket: dict[int, list] = {}
    while not any(len(v) >= 3 for v in by_bucket.values()):
        peer = KeyPair.generate().peer_id
        index = (table.local_key ^ peer_key(peer)).bit_length() - 1
        by_bucket.setdefault(index, []).append(peer)
    index, peers = next((i, v) for i, v in by_bucket.items() if len(v) >= 3)
    table.add(peers[0])
    assert table.complete_up_to(255)
    table.add(peers[1])  # the bucket is full: a third peer there would be turned away
    assert not table.complete_up_to(index) and table.complete_up_to(index - 1)
    assert table.add(peers[2]) is not None and not table.complete_up_to(255)
    table.remove(peers[0])
    assert table.complete_up_to(255)
    table.add(peers[0])
    assert not table.complete_up_to(255)
    for _ in range(3):  # three failures in a row drop a contact: the bucket has room again
        table.failed(peers[1])
    assert peers[1] not in table and table.complete_up_to(255)


def test_optimistic_store_only_where_the_table_is_complete():
    """A table of a small network sends early for every key; one of a large network (full buckets
    near the top) for almost none, so a large network does not get k extra PUT_VALUEs per put."""
    import os

    from lattice.dht.service import DHT

    for peers, low, high in ((16, 1.0, 1.0), (2000, 0.0, 0.05)):  # 16 < k: no bucket can fill
        dht = DHT()
        local = KeyPair.generate().peer_id
        dht.table = RoutingTable(local, dht.config.k)
        for _ in range(peers):
            dht.table.add(KeyPair.generate().peer_id)
        keys = [key_id(os.urandom(8)) for _ in range(400)]
        share = sum(bool(dht._optimistic_targets(t)) for t in keys) / len(keys)
        assert low <= share <= high, (peers, share)
