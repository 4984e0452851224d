"""The DHT's wide-area levers on real nodes over loopback: a put returns at its quorum while a replica
that never answers holds its request (the record still reaches every live replica), a node keeps
connections to its routing-table contacts warm, and the bucket refresh's keys cover the far buckets."""

from __future__ import annotations

import trio

from conftest import dht_swarm
from lattice.dht.keys import bucket_index, bucket_probe_keys, key_id, peer_key
from lattice.dht.service import EARLY_SELF_LOOKUPS
from lattice.identity import KeyPair
from lattice.multiaddr import Multiaddr


async def _silent_listener(nursery: trio.Nursery) -> int:
    """A TCP port that accepts connections and never says a word (a replica whose packets are lost):
    a request to it ends only at its timeout."""
    held: list[trio.SocketStream] = []
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def hold(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, hold, listeners)
    return listeners[0].socket.getsockname()[1]


async def test_put_returns_at_its_quorum_and_the_rest_completes_in_the_background(tmp_path, nursery):
    swarm = await dht_swarm(tmp_path, nursery, 6)
    a = swarm[0]
    silent = KeyPair.generate().peer_id
    addr = Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{await _silent_listener(nursery)}")
    a.host.peerstore.add_addrs(silent, [addr])
    a.dht.table.add(silent, [addr])  # one of the k closest to every key in this swarm
    a.dht.config.request_timeout = 2.0
    a.dht.config.store_quorum = 3

    start = trio.current_time()
    stored = await a.dht.put("wan/quorum", b"v", ttl=600)
    took = trio.current_time() - start
    assert took < 1.5 and stored >= 4  # a quorum of 3 peers acknowledged, and this node keeps it
    with trio.fail_after(3):  # the requests it did not wait for end in the background
        while not all([await n.dht.get("wan/quorum", local=True) for n in swarm]):
            await trio.sleep(0.05)

    a.dht.config.store_quorum = 0  # wait for every replica: the silent one holds the put to its timeout
    start = trio.current_time()
    assert await a.dht.put("wan/all", b"v", ttl=600) == 6
    assert trio.current_time() - start >= 1.9
    assert [e.value for e in await swarm[5].dht.get("wan/all")] == [b"v"]  # honest peers still served


async def test_routing_table_contacts_stay_connected(tmp_path, nursery):
    swarm = await dht_swarm(tmp_path, nursery, 6)
    a, b = swarm[2], swarm[4]  # neither is the bootstrap peer (the connection manager redials that one)
    for node in swarm:
        node.dht.config.warm_interval = 0.5
    assert b.peer_id in a.dht.warm_contacts()
    # after the early self-lookups (which reconnect whom they query), the next is 15 s away
    await trio.sleep(sum(EARLY_SELF_LOOKUPS[:2]) + 1.5)
    await a.host.disconnect(b.peer_id)
    assert a.host.connection_to(b.peer_id) is None
    with trio.fail_after(2):  # warm passes run every warm_interval
        while a.host.connection_to(b.peer_id) is None:
            await trio.sleep(0.05)
    assert a.dht.stats()["warm_contacts"] == len(a.dht.table)


def test_bucket_probe_keys_land_in_the_farthest_buckets():
    local = peer_key(KeyPair.generate().peer_id)
    keys = bucket_probe_keys(local, 8)
    assert [bucket_index(local, key_id(k)) for k in keys] == list(range(255, 247, -1))
