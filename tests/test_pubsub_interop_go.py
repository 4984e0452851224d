"""Gossipsub wire compatibility with go-libp2p-pubsub: p2pd (``-pubsub``, gossipsub, StrictSign, its
defaults) and an in-process Lattice node exchange signed messages in both directions.

p2pd's pubsub control requests (go-libp2p-daemon's p2pd.proto): Request{type=PUBSUB (8), pubsub=8:
PSRequest{type=1 (GET_TOPICS 0, LIST_PEERS 1, PUBLISH 2, SUBSCRIBE 3), topic=2, data=3}}; after a
SUBSCRIBE the control connection streams PSMessage{from=1, data=2, seqno=3, topicIDs=4, ...}.
"""

from __future__ import annotations

import pytest
import trio

from _p2pd import find_p2pd, start_p2pd
from lattice import Node, NodeConfig, _proto
from lattice.multiaddr import Multiaddr
from lattice.pubsub import PubSub

P2PD = find_p2pd()
if P2PD is None:
    pytest.skip("go-libp2p daemon p2pd not found (bash tools/get_p2pd.sh)", allow_module_level=True)

pytestmark = pytest.mark.interop

PUBSUB = 8
PS_LIST_PEERS, PS_PUBLISH, PS_SUBSCRIBE = 1, 2, 3


def _ps_request(ps_type: int, topic: str, data: bytes | None = None) -> bytes:
    return _proto.encode([(1, PUBSUB), (8, _proto.encode([(1, ps_type), (2, topic), (3, data)]))])


async def test_lattice_and_go_libp2p_exchange_gossipsub_messages(tmp_path):
    topic = "lattice-interop"
    cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / "n", control=False)
    async with (
        start_p2pd(P2PD, dht="", extra_args=("-pubsub",)) as go,
        Node(cfg, services=[PubSub()]) as node,
    ):
        got: list[tuple[str, bytes]] = []
        node.pubsub.subscribe(topic, lambda peer, data: got.append((str(peer), data)))
        sub = await go.control._open()  # the subscription stream stays open
        await sub.send_msg(_ps_request(PS_SUBSCRIBE, topic))
        _check_ok(await sub.read_msg())
        await go.control.connect(node.peer_id, [Multiaddr.parse(node.addrs[0])])
        with trio.fail_after(20):  # each side learns the other's subscription
            while not node.pubsub.peers(topic):
                await trio.sleep(0.05)
            while str(node.peer_id) not in await _go_topic_peers(go, topic):
                await trio.sleep(0.05)
        await trio.sleep(1.5)  # a heartbeat: meshes formed on both sides

        for i in range(3):  # go -> lattice, signed by go (StrictSign), verified here
            conn = await go.control._open()
            await conn.send_msg(_ps_request(PS_PUBLISH, topic, f"from go {i}".encode()))
            _check_ok(await conn.read_msg())
            await conn.aclose()
        with trio.fail_after(10):
            while len(got) < 3:
                await trio.sleep(0.02)
        assert got == [(str(go.peer_id), f"from go {i}".encode()) for i in range(3)]

        for i in range(3):  # lattice -> go, signed here, verified by go-libp2p-pubsub
            node.pubsub.publish(topic, f"from lattice {i}".encode())
        received = []
        with trio.fail_after(10):
            while len(received) < 3:
                msg = _proto.decode(await sub.read_msg())
                if _proto.one_bytes(msg, 1) == go.peer_id.multihash:
                    continue  # its own messages come back on the subscription too
                received.append((_proto.one_bytes(msg, 1), _proto.one_bytes(msg, 2)))
        expected = [(node.peer_id.multihash, f"from lattice {i}".encode()) for i in range(3)]
        assert sorted(received) == expected  # go validates in parallel: order is not kept
        assert node.pubsub.counters["bad_signatures"] == 0
        await sub.aclose()


def _check_ok(raw: bytes) -> None:
    fields = _proto.decode(raw)
    if _proto.one_int(fields, 1) != 0:
        err = _proto.one_bytes(fields, 2)
        raise AssertionError(f"p2pd error: {_proto.decode(err) if err else raw!r}")


async def _go_topic_peers(go, topic: str) -> set[str]:
    from lattice.identity import PeerId

    conn = await go.control._open()
    try:
        await conn.send_msg(_ps_request(PS_LIST_PEERS, topic))
        fields = _proto.decode(await conn.read_msg())
    finally:
        await conn.aclose()
    ps = _proto.one_bytes(fields, 7)
    if not ps:
        return set()
    return {str(PeerId(p)) for p in _proto.all_bytes(_proto.decode(ps), 2)}
