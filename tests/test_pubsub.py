"""Gossipsub: the wire format, the sans-IO mesh (simulated, deterministic), and real nodes."""

from __future__ import annotations

import random

import pytest
import trio

from lattice import _proto
from lattice.errors import PayloadError
from lattice.pubsub import RPC, GossipRouter, Message, protocol
from lattice.pubsub.router import D_HI, D_LO


def test_rpc_round_trip_and_malformed_input():
    rpc = RPC(
        subscriptions=[(True, "a"), (False, "b")],
        messages=[Message("a", b"x" * 100)],
        ihave=[("a", [b"1" * 20, b"2" * 20])],
        iwant=[b"3" * 20],
        graft=["a"],
        prune=[("b", 60)],
    )
    assert protocol.decode(protocol.encode(rpc)) == rpc
    for raw in (b"\xff", b"\x0a\x05ab", _proto.encode([(2, _proto.encode([(2, b"data")]))])):
        with pytest.raises(PayloadError):
            protocol.decode(raw)  # garbage, truncated, a message without a topic
    with pytest.raises(PayloadError):
        protocol.decode(b"\0" * (protocol.MAX_RPC + 1))


class Net:
    """Routers exchanging RPCs in memory; ``lossy`` links drop messages (not control)."""

    def __init__(self, n: int, degree: int | None = None, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.routers = [GossipRouter(random.Random(seed + i)) for i in range(n)]
        self.got: list[list[bytes]] = [[] for _ in range(n)]
        self.lossy: set[tuple[int, int]] = set()
        self.now = 0.0
        for i in range(n):
            others = [j for j in range(n) if j != i]
            for j in self.rng.sample(others, degree) if degree else others:
                self.routers[i].add_peer(j)
                self.routers[j].add_peer(i)

    def run(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            moved = False
            for i, r in enumerate(self.routers):
                for j, rpc in r.drain():
                    moved = True
                    if (i, j) in self.lossy:
                        rpc.messages = []
                    for m in self.routers[j].handle(i, rpc, self.now):
                        self.got[j].append(m.data)
            if not moved:
                return

    def heartbeat(self, n: int = 1) -> None:
        for _ in range(n):
            self.now += 1.0
            for r in self.routers:
                r.heartbeat(self.now)
            self.run()


def test_mesh_degrees_and_exactly_once_delivery():
    net = Net(30, degree=10)
    for r in net.routers:
        r.subscribe("t")
    net.run()
    net.heartbeat(3)
    for r in net.routers:
        assert D_LO <= len(r.mesh["t"]) <= D_HI
    net.routers[0].publish("t", b"hello", net.now)
    net.run()
    assert all(g == [b"hello"] for g in net.got[1:]) and net.got[0] == []
    forwarded = sum(r.stats["forwarded"] for r in net.routers)
    assert forwarded < 30 * D_HI  # mesh forwarding, not flooding to every peer


def test_gossip_repairs_a_lost_mesh_message():
    net = Net(30, degree=12)
    for r in net.routers:
        r.subscribe("t")
    net.run()
    net.heartbeat(2)
    victim = 29
    outside = set(net.routers[victim].peer_topics) - net.routers[victim].mesh["t"]
    assert outside  # it has neighbours outside its mesh: they gossip to it
    # the victim loses every message on every link: only IHAVE/IWANT can bring it
    net.lossy = {(i, victim) for i in range(30)}
    publisher = next(i for i in range(30) if i != victim and i not in net.routers[victim].peer_topics)
    net.routers[publisher].publish("t", b"m1", net.now)
    net.run()
    assert net.got[victim] == [] and all(net.got[i] == [b"m1"] for i in range(29) if i != publisher)
    net.lossy.clear()
    net.heartbeat(1)  # IHAVE from peers outside its mesh -> IWANT -> the message
    assert net.got[victim] == [b"m1"]


def test_rejected_messages_are_not_forwarded_and_duplicates_dropped():
    net = Net(6)
    for r in net.routers:
        r.subscribe("t")
    net.run()
    net.heartbeat(2)
    rpc = RPC(messages=[Message("t", b"bad")])
    delivered = net.routers[1].handle(0, rpc, net.now, validate=lambda p, m: False)
    assert delivered == [] and net.routers[1].stats["rejected"] == 1
    assert all(not r.messages for _, r in net.routers[1].drain())
    # a rejected message is not marked seen: a forgery cannot pre-empt the genuine message's id
    genuine = net.routers[1].handle(2, RPC(messages=[Message("t", b"bad")]), net.now)
    assert [m.data for m in genuine] == [b"bad"]
    again = net.routers[1].handle(3, RPC(messages=[Message("t", b"bad")]), net.now)
    assert again == [] and net.routers[1].stats["duplicates"] == 1


def test_strict_sign_messages_verify_and_forgeries_do_not():
    from dataclasses import replace

    from lattice.identity import KeyPair

    key = KeyPair.generate()
    m = protocol.signed(key, "t", b"data", 7)
    assert m.verify() and m.id == key.peer_id.multihash + (7).to_bytes(8, "big")
    assert protocol.decode(protocol.encode(RPC(messages=[m]))).messages == [m]
    stranger = KeyPair.generate().peer_id.multihash
    changes = [{"data": b"other"}, {"signature": bytes(64)}, {"signature": None}, {"from_": stranger},
               {"seqno": b"\0" * 8}]  # fmt: skip
    for change in changes:
        assert not replace(m, **change).verify()


def test_unsubscribe_prunes_and_graft_from_backoff_is_refused():
    net = Net(5)
    for r in net.routers:
        r.subscribe("t")
    net.run()
    net.heartbeat(2)
    net.routers[0].unsubscribe("t")
    net.run()
    assert all(0 not in r.mesh["t"] for r in net.routers[1:])
    assert all("t" not in r.peer_topics[0] for r in net.routers[1:])


def test_prunes_of_foreign_topics_and_huge_backoffs_are_not_kept():
    """A PRUNE flood naming random topics (5,000 per RPC) grew the backoff table without bound, and a
    backoff of 2^63 s kept its entry forever."""
    from lattice.pubsub.router import MAX_BACKOFF

    r = GossipRouter()
    r.subscribe("t")
    for i in range(20):
        r.handle("attacker", RPC(prune=[(f"junk/{i}/{j}", 1 << 62) for j in range(5000)]), 0.0)
    r.handle("attacker", RPC(subscriptions=[(True, "t")], prune=[("t", 1 << 62)]), 0.0)
    assert len(r._backoff) == 1 and r._backoff[("t", "attacker")] == MAX_BACKOFF
    r.heartbeat(MAX_BACKOFF + 1)
    assert not r._backoff
    r.handle("attacker", RPC(prune=[("t", 10)]), 0.0)
    r.remove_peer("attacker")
    assert not r._backoff  # a departed peer's backoffs go with it


def test_a_peer_claiming_thousands_of_topics_is_tracked_up_to_a_cap():
    from lattice.pubsub.router import MAX_PEER_TOPICS

    r = GossipRouter()
    r.subscribe("t")
    subs = [(True, f"topic/{i}") for i in range(5000)]
    r.handle("attacker", RPC(subscriptions=subs), 0.0)
    r.handle("attacker", RPC(subscriptions=subs), 0.0)
    assert len(r.peer_topics["attacker"]) == MAX_PEER_TOPICS
    assert r.stats["ignored_subscriptions"] > 0


def test_ihave_floods_do_not_make_us_ask_for_more_than_the_allowance():
    """gossipsub v1.1's max_ihave_length / max_ihave_messages: per peer and heartbeat."""
    from lattice.pubsub.router import MAX_IHAVE_IDS, MAX_IHAVE_MESSAGES

    r = GossipRouter()
    r.subscribe("t")
    r.handle("attacker", RPC(subscriptions=[(True, "t")]), 0.0)
    r.drain()
    asked = 0
    for n in range(50):  # 50 RPCs of IHAVEs of ids that will never be delivered
        ihave = [("t", [b"%d-%d-%d" % (n, k, i) for i in range(400)]) for k in range(20)]
        r.handle("attacker", RPC(ihave=ihave), 0.0)
        asked += sum(len(rpc.iwant) for _, rpc in r.drain())
    assert asked == min(MAX_IHAVE_IDS, MAX_IHAVE_MESSAGES * 400)  # not 50 x 20 x 400
    r.heartbeat(1.0)
    r.handle("attacker", RPC(ihave=[("t", [b"fresh-%d" % i for i in range(10)])]), 1.0)
    assert sum(len(rpc.iwant) for _, rpc in r.drain()) == 10  # a new heartbeat, a new allowance


def test_iwant_floods_are_served_within_a_byte_budget_per_heartbeat():
    from lattice.pubsub.router import MAX_IWANT_BYTES_PER_HEARTBEAT

    r = GossipRouter()
    r.subscribe("t")
    r.handle("leech", RPC(subscriptions=[(True, "t")]), 0.0)
    ids = [r.publish("t", bytes([i]) * 100_000, 0.0) for i in range(40)]  # 4 MB in the cache
    r.drain()
    served = 0
    for _ in range(100):  # tiny IWANT RPCs asking for everything, over and over
        r.handle("leech", RPC(iwant=ids), 0.0)
        served += sum(len(m.data) for _, rpc in r.drain() for m in rpc.messages)
    assert served <= MAX_IWANT_BYTES_PER_HEARTBEAT
    r.heartbeat(1.0)
    r.handle("leech", RPC(iwant=ids[:1]), 1.0)
    assert sum(len(m.data) for _, rpc in r.drain() for m in rpc.messages) == 100_000


async def start_star(tmp_path, nursery, services=None):
    """4 nodes on loopback that bootstrap from the first (a star until the DHT fills in)."""
    from contextlib import AsyncExitStack

    from lattice import Node, NodeConfig

    nodes: list[Node] = []
    ready = trio.Event()

    async def run():
        async with AsyncExitStack() as stack:
            for i in range(4):
                boot = [nodes[0].addrs[0]] if nodes else []
                cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / f"n{i}", control=False,
                                 bootstrap=boot)  # fmt: skip
                node = Node(cfg, services=services()) if services else Node(cfg)
                nodes.append(await stack.enter_async_context(node))
            ready.set()
            await trio.sleep_forever()

    nursery.start_soon(run)
    await ready.wait()
    return nodes


async def test_real_nodes_publish_and_receive(tmp_path, nursery):
    nodes = await start_star(tmp_path, nursery)
    got: list[list[bytes]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        node.pubsub.subscribe("news", lambda peer, data, i=i: got[i].append(data))
    with trio.fail_after(10):
        while any(len(n.pubsub.peers("news")) < 3 for n in nodes):
            await trio.sleep(0.02)
    nodes[1].pubsub.publish("news", b"one")
    with trio.fail_after(10):
        while any(g != [b"one"] for i, g in enumerate(got) if i != 1):
            await trio.sleep(0.02)
    with pytest.raises(PayloadError):
        nodes[0].pubsub.publish("news", b"\0" * protocol.MAX_RPC)


async def test_crdt_documents_replicate_over_the_gossip_mesh(tmp_path, nursery):
    """CRDT(gossip_above=0): every write goes through gossipsub (what a large swarm does), and the
    mesh forwards: leaves connected only to a hub get each other's writes."""
    from lattice.crdt.service import CRDT
    from lattice.pubsub import PubSub

    # no anti-entropy help
    nodes = await start_star(tmp_path, nursery, lambda: [PubSub(), CRDT(sync_interval=3600, gossip_above=0)])
    docs = [n.crdt.open("g") for n in nodes]
    topic = "/lattice/crdt/g"
    with trio.fail_after(10):  # a star (no DHT here): the leaves reach each other only through n0
        while len(nodes[0].pubsub.peers(topic)) < 3 or any(not n.pubsub.peers(topic) for n in nodes):
            await trio.sleep(0.02)
    await trio.sleep(1.2)  # a heartbeat: meshes formed
    for i, doc in enumerate(docs):
        for j in range(30):
            doc.get_map("root")[f"{i}-{j}"] = j
    with trio.fail_after(10):
        while any(len(d.get_map("root")) < 120 for d in docs):
            await trio.sleep(0.02)
    assert all(d.get_map("root").to_py() == docs[0].get_map("root").to_py() for d in docs)
    assert all(n.crdt.counters["pushed"] == 30 for n in nodes)  # published, not pushed per peer
    assert nodes[0].pubsub.router.stats["forwarded"] > 0
