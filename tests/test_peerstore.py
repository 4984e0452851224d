"""The bounded peer store: least recently used peers leave first, kept peers never, addresses capped."""

from __future__ import annotations

from lattice.identity import KeyPair
from lattice.multiaddr import Multiaddr
from lattice.transport.peerstore import PeerStore


def peers(n):
    return [KeyPair.generate().peer_id for _ in range(n)]


def addr(port: int) -> Multiaddr:
    return Multiaddr.parse(f"/ip4/10.0.0.1/tcp/{port}")


def test_least_recently_used_leave_first_and_kept_peers_stay():
    kept = set()
    removed = []
    store = PeerStore(max_peers=3)
    store.keep(kept.__contains__)
    store.on_remove(removed.append)
    a, b, c, d, e = peers(5)
    for p in (a, b, c):
        store.add(p)
    kept.add(a)  # a is connected: never evicted, however old
    store.get(b)  # b was used: c is now the least recently used unkept peer
    store.add(d)
    assert c not in store and removed == [c]
    store.add(e)
    assert b not in store and {a, d, e} == {p for p, _ in store.items()}
    assert len(store) == 3 and store.status()["evicted"] == 2


def test_all_kept_peers_can_exceed_the_cap_and_a_newcomer_leaves_at_once():
    store = PeerStore(max_peers=2)
    store.keep(lambda p: True)
    for p in peers(4):
        store.add(p)
    assert len(store) == 4  # connected / routing-table peers are never dropped


def test_addresses_are_capped_newest_first():
    store = PeerStore(max_addrs=3)
    (p,) = peers(1)
    store.add_addrs(p, [addr(1), addr(2)])
    store.add_addrs(p, [addr(3), addr(4)])
    assert store.get(p).addrs == [addr(3), addr(4), addr(1)]
    store.add_addrs(p, [addr(9)], replace=True)
    assert store.get(p).addrs == [addr(9)]
    store.add_addrs(p, [addr(i) for i in range(100)], replace=True)
    assert len(store.get(p).addrs) == 3


def test_a_flood_of_fake_peers_stays_at_the_cap_quickly():
    store = PeerStore(max_peers=1000)
    kept = set(peers(10))
    store.keep(kept.__contains__)
    for p in kept:
        store.add(p)
    fake = [KeyPair.generate().peer_id for _ in range(5000)]
    for p in fake:
        store.add_addrs(p, [addr(1)])
    assert len(store) == 1000 and kept <= {p for p, _ in store.items()}


async def test_peers_that_leave_are_forgotten_beyond_the_cap(nursery):
    """Real hosts: 10 peers connect, identify and leave; a store of 4 keeps the connected one."""
    import trio

    from conftest import full_addr
    from lattice.transport import HostConfig, open_host
    from lattice.transport.resources import ResourceLimits

    config = HostConfig(resources=ResourceLimits(peerstore_peers=4))
    async with open_host(KeyPair.generate(), config) as victim, open_host(KeyPair.generate()) as stays:
        await victim.listen("/ip4/127.0.0.1/tcp/0")
        await stays.connect(full_addr(victim))
        for _ in range(10):
            async with open_host(KeyPair.generate()) as visitor:
                conn = await visitor.connect(full_addr(victim))
                await visitor.wait_identified(conn.remote_peer)
                await victim.wait_identified(visitor.peer_id)
        with trio.fail_after(5):
            while len(victim.connected_peers()) > 1:
                await trio.sleep(0.02)
        assert len(victim.peerstore) <= 4 and stays.peer_id in victim.peerstore
        assert victim.peerstore.status()["evicted"] >= 7
