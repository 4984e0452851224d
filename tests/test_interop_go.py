"""Wire compatibility with go-libp2p: the go-libp2p daemon ``p2pd`` against an in-process Lattice node.

p2pd (hivemind 1.1.12's build: go-libp2p with go-libp2p-kad-dht v0.25.1) is driven through its
control socket (tests/_p2pd.py). Fetch it with ``bash tools/get_p2pd.sh``; the module is skipped when
the binary is absent. Everything listens on 127.0.0.1; p2pd runs with no bootstrap, relay, AutoNAT or
NAT port mapping, and is killed when each test ends.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import asynccontextmanager

import pytest
import trio

from _p2pd import P2PDError, find_p2pd, start_p2pd
from lattice import Node, NodeConfig, _proto
from lattice.dht import DHT
from lattice.dht import protocol as kad
from lattice.errors import LatticeError
from lattice.identity import KeyPair, PeerId
from lattice.multiaddr import Multiaddr
from lattice.rpc import RPC
from lattice.transport import ping
from lattice.transport.framing import read_delimited
from lattice.transport.identify import decode as decode_identify
from lattice.transport.peerstore import PeerInfo

P2PD = find_p2pd()
if P2PD is None:
    pytest.skip(
        "go-libp2p daemon p2pd not found at $LATTICE_P2PD or ~/.cache/lattice/p2pd/p2pd "
        "(fetch it with: bash tools/get_p2pd.sh)",
        allow_module_level=True,
    )

pytestmark = pytest.mark.interop

KAD = "/ipfs/kad/1.0.0"  # the protocol go-libp2p-kad-dht speaks by default
TIMEOUT = 30
NO_PEERS = "failed to find any peer in table"  # go-libp2p-kad-dht, routing table empty


@asynccontextmanager
async def lattice_node(tmp_path, name: str):
    """A node with the profile a user picks to speak with libp2p peers' Kademlia (``--join libp2p``)."""
    cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / name, control=False, swarm="libp2p")
    async with Node(cfg, services=[RPC(), DHT()]) as node:
        assert node.dht.protocol_id == KAD
        yield node


@asynccontextmanager
async def go_peer(dht: str = "server"):
    assert P2PD is not None
    async with start_p2pd(P2PD, dht=dht) as daemon:
        yield daemon


async def go_connects_to(go, node) -> None:
    await go.control.connect(node.peer_id, [Multiaddr.parse(node.addrs[0])])


async def go_closest_peers(go, timeout: float) -> list[PeerId]:
    """GET_CLOSEST_PEERS, retried while go's routing table is still empty (peers enter it only
    after identify and a FIND_NODE "lookup check", both asynchronous)."""
    with trio.fail_after(timeout):
        while True:
            try:
                return await go.control.get_closest_peers(os.urandom(16), timeout=5)
            except P2PDError as exc:
                if NO_PEERS not in str(exc):
                    raise
            await trio.sleep(0.05)


def cid_v0(data: bytes) -> bytes:
    """A sha2-256 multihash: a CIDv0 for go, and the DHT key go uses for it."""
    return b"\x12\x20" + hashlib.sha256(data).digest()


async def kad_request(go, peer: PeerId, message: kad.Message) -> kad.Message:
    """One raw Kademlia request on a stream p2pd opens to ``peer``."""
    async with go.control.stream_open(peer, [KAD]) as stream:
        body = kad.encode(message)
        await stream.send_all(_proto.encode_uvarint(len(body)) + body)
        return kad.decode(await stream.read_msg())


async def test_go_dials_us_identifies_and_pings(tmp_path):
    async with lattice_node(tmp_path, "a") as node, go_peer() as go:
        with trio.fail_after(TIMEOUT):
            await go_connects_to(go, node)
            assert node.peer_id in [p.peer for p in await go.control.list_peers()]
            me = await go.control.identify()
            assert me.peer == go.peer_id and me.addrs

            # our side: an inbound connection, and identify of the go peer
            info = await node.host.wait_identified(go.peer_id)
            conn = node.host.connection_to(go.peer_id)
            assert conn is not None and conn.direction == "inbound"
            assert conn.muxer_in_handshake  # go lists its muxers in the Noise handshake, as we do
            assert info.agent_version.startswith("p2pd/")  # p2pd's agent string is "p2pd/0.1"
            assert info.public_key is not None and info.public_key.peer_id() == go.peer_id
            for proto in ("/ipfs/id/1.0.0", "/ipfs/ping/1.0.0", KAD):
                assert proto in info.protocols
            assert any(a.tcp_target() for a in info.addrs)

            # an idle connection stays up (no keep-alive or stream needed)
            await trio.sleep(1.0)
            assert node.host.connection_to(go.peer_id) is conn and not conn.closed

            # go pings us: our ping handler echoes each 32-byte payload on the same stream
            async with go.control.stream_open(node.peer_id, [ping.PROTOCOL_ID]) as stream:
                assert stream.protocol == ping.PROTOCOL_ID
                for _ in range(3):
                    payload = os.urandom(32)
                    await stream.send_all(payload)
                    assert await stream.read_exactly(32) == payload

            # go asks for our identify record: it is what we advertise
            async with go.control.stream_open(node.peer_id, ["/ipfs/id/1.0.0"]) as stream:
                ours = PeerInfo(node.peer_id)
                decode_identify(await stream.read_msg(), ours)
            assert ours.agent_version == node.host.config.agent_version
            assert KAD in ours.protocols and ping.PROTOCOL_ID in ours.protocols
            assert [str(a.with_peer(node.peer_id)) for a in ours.addrs] == node.addrs

            # go-libp2p's FIND_PEER for a connected peer answers from its peerstore
            found = await go.control.find_peer(node.peer_id)
            assert found.peer == node.peer_id
            assert Multiaddr.parse(node.addrs[0]).without_peer() in found.addrs


async def test_go_queries_our_dht(tmp_path):
    """go's Kademlia walks two Lattice nodes: FIND_NODE answers, closer peers with dialable addresses,
    and provider records both ways."""
    async with lattice_node(tmp_path, "a") as a, lattice_node(tmp_path, "b") as b, go_peer() as go:
        with trio.fail_after(TIMEOUT):
            await a.connect(b.addrs[0])
            await a.host.wait_identified(b.peer_id)
            await b.host.wait_identified(a.peer_id)
            await go_connects_to(go, a)  # go knows only A; it learns B from A's FIND_NODE replies

            closest = await go_closest_peers(go, timeout=10)
            assert set(closest) == {a.peer_id, b.peer_id}
            assert a.dht.counters["requests_in"] > 0 and b.dht.counters["requests_in"] > 0
            assert a.dht.counters["malformed"] == b.dht.counters["malformed"] == 0

            # FIND_PEER through the DHT: B's address came from A's reply, and go dialled it
            found = await go.control.find_peer(b.peer_id)
            assert Multiaddr.parse(b.addrs[0]).without_peer() in found.addrs
            assert b.peer_id in [p.peer for p in await go.control.list_peers()]

            # go announces a provider record (ADD_PROVIDER to the closest peers: A and B) ...
            key = cid_v0(b"lattice go interop: provided by go")
            await go.control.provide(key)
            for node in (a, b):
                providers = await node.dht.find_providers(key)
                assert str(go.peer_id) in [p for p, _ in providers]

            # ... and finds the one A announces
            key = cid_v0(b"lattice go interop: provided by lattice")
            assert await a.dht.provide(key) >= 1
            providers = await go.control.find_providers(key, count=1)
            assert [p.peer for p in providers] == [a.peer_id]
            assert Multiaddr.parse(a.addrs[0]).without_peer() in providers[0].addrs


async def test_we_dial_go_identify_ping_and_use_its_dht(tmp_path):
    async with lattice_node(tmp_path, "a") as node, go_peer() as go:
        with trio.fail_after(TIMEOUT):
            addr = go.addrs[0].with_peer(go.peer_id)
            assert await node.connect(str(addr)) == str(go.peer_id)
            conn = node.host.connection_to(go.peer_id)
            assert conn is not None and conn.direction == "outbound"
            assert conn.muxer_in_handshake  # go accepted our lazy /noise and agreed Yamux in the handshake
            info = await node.host.wait_identified(go.peer_id)
            assert info.agent_version.startswith("p2pd/")
            assert KAD in info.protocols

            rtts = await ping.ping(node.host, go.peer_id, count=5)
            assert len(rtts) == 5 and all(r > 0 for r in rtts)
            assert len(await node.ping(str(go.peer_id), count=2)) == 2

            assert node.peer_id in [p.peer for p in await go.control.list_peers()]

            # our Kademlia client against go's server: a lookup (GET_VALUE, go answers with closer
            # peers only) and a provider record go stores and serves
            assert await node.dht.get(b"nobody stored this") == []
            key = cid_v0(b"lattice go interop: we dialled")
            assert await node.dht.provide(key) == 1
            providers = await go.control.find_providers(key, count=1)
            assert [p.peer for p in providers] == [node.peer_id]
            assert node.dht.counters["failed_requests"] == 0 and node.dht.counters["malformed"] == 0


async def test_we_find_a_third_peer_through_go(tmp_path):
    """We know one go peer, which knows another: FIND_NODE to the first finds the second, and we dial
    it by peer id alone."""
    async with lattice_node(tmp_path, "a") as node, go_peer() as go1, go_peer() as go2:
        with trio.fail_after(TIMEOUT):
            await go2.control.connect(go1.peer_id, go1.addrs)
            await go_closest_peers(go1, timeout=10)  # go2 is in go1's routing table
            await node.connect(str(go1.addrs[0].with_peer(go1.peer_id)))
            await node.host.wait_identified(go1.peer_id)
            addrs = await node.dht.find_peer(go2.peer_id)
            assert go2.addrs[0] in [a.without_peer() for a in addrs]
            assert await node.connect(str(go2.peer_id)) == str(go2.peer_id)


# go-libp2p-kad-dht (v0.25.1 in this p2pd build) admits a newly identified DHT server into its routing
# table only after a "lookup check": a FIND_NODE of that peer's own id must return at least one peer.
# A lone Lattice node lists itself (DHT._find_node), so it passes.


async def test_find_node_for_our_own_id_lists_us(tmp_path):
    async with lattice_node(tmp_path, "a") as node, go_peer() as go:
        with trio.fail_after(TIMEOUT):
            await go_connects_to(go, node)
            reply = await kad_request(go, node.peer_id, kad.Message(kad.FIND_NODE, node.peer_id.multihash))
            me = node.peer_id
    assert reply.type == kad.FIND_NODE
    assert me in [entry.peer for entry in reply.closer]


async def test_go_adds_a_lone_lattice_node_to_its_routing_table(tmp_path):
    closest = None
    async with lattice_node(tmp_path, "a") as node, go_peer() as go:
        with trio.fail_after(TIMEOUT):
            await go_connects_to(go, node)
            await node.host.wait_identified(go.peer_id)
        with trio.move_on_after(5):
            closest = await go_closest_peers(go, timeout=10)
        me = node.peer_id
    assert closest == [me], f"go's routing table stayed empty ({NO_PEERS!r})"


# -- what a go peer's writes and client-mode requests get


def pk_record(keypair) -> tuple[bytes, bytes]:
    """A standard libp2p record go validates and stores: /pk/<peer id multihash> -> the public key."""
    return b"/pk/" + keypair.peer_id.multihash, keypair.public_key.to_protobuf()


async def test_go_put_value_of_a_libp2p_record_is_refused_and_go_survives(tmp_path):
    """go's PUT_VALUE of a /pk/ record: Lattice stores only its own signed records, so it refuses it as
    go's own server refuses a record its validator rejects (stream reset). An empty PUT_VALUE reply
    made p2pd panic and exit; now go logs the refused peer and keeps serving."""
    async with lattice_node(tmp_path, "a") as node, go_peer() as go:
        with trio.fail_after(TIMEOUT):
            await go_connects_to(go, node)
            await go_closest_peers(go, timeout=10)  # the Lattice node is in go's table
            key, value = pk_record(KeyPair.generate())
            await go.control.put_value(key, value)  # go keeps it locally; it logs the refused peer
            await trio.sleep(0.5)
            assert go.process.poll() is None, f"p2pd exited: {go.log()[-3000:]}"
            assert node.dht.counters["rejected_records"] >= 1 and node.dht.store.record_count == 0
            # both sides still serve: go finds our providers, we find go's
            cid = cid_v0(b"after the refused put")
            assert await node.dht.provide(cid) == 1
            assert [p.peer for p in await go.control.find_providers(cid, count=1)] == [node.peer_id]
            cid = cid_v0(b"go provides after the refused put")
            await go.control.provide(cid)
            assert str(go.peer_id) in [p for p, _ in await node.dht.find_providers(cid)]


async def test_a_refused_put_still_lists_closer_peers_to_a_lattice_putter(tmp_path):
    """A Lattice putter that asked for closer peers (WANT_CLOSER) gets them even when refused: the reset
    is for putters that expect libp2p's reply (go, rust)."""
    async with (
        lattice_node(tmp_path, "a") as a,
        lattice_node(tmp_path, "b") as b,
        lattice_node(tmp_path, "c") as c,
    ):
        with trio.fail_after(TIMEOUT):
            await a.connect(b.addrs[0])
            await c.connect(b.addrs[0])
            await b.host.wait_identified(a.peer_id)
            await b.host.wait_identified(c.peer_id)
            request = kad.Message(kad.PUT_VALUE, b"k", b"k", b"not a lattice record", want_closer=True)
            reply = await raw_request(a, b.peer_id, request)
            assert reply is not None and reply.type == kad.PUT_VALUE and reply.record_value is None
            assert [e.peer for e in reply.closer] == [c.peer_id]  # B's contacts but the requester
            # without WANT_CLOSER: the stream is reset, as go's server does
            refused = kad.Message(kad.PUT_VALUE, b"k", b"k", b"not a lattice record either")
            assert await raw_request(a, b.peer_id, refused) is None
            assert b.dht.counters["rejected_records"] == 2


async def raw_request(node, peer: PeerId, message: kad.Message) -> kad.Message | None:
    """One Kademlia request on a new stream; None if the peer reset or closed it instead of replying."""
    stream = await node.host.new_stream(node.host.connection_to(peer), [KAD])
    await stream.write(_proto.delimited(kad.encode(message)))
    try:
        raw = await read_delimited(stream, kad.MAX_MESSAGE)
    except LatticeError:
        return None
    return kad.decode(raw) if raw is not None else None


async def test_go_in_client_mode_is_served_but_not_in_our_routing_table(tmp_path):
    """A go peer in DHT client mode (-dhtClient: identify does not list the kad protocol) queries us
    and is answered, but it does not enter our routing table (Kademlia spec): lookups must not waste
    queries on a peer that does not serve them."""
    async with lattice_node(tmp_path, "a") as a, lattice_node(tmp_path, "b") as b, go_peer("client") as go:
        with trio.fail_after(TIMEOUT):
            await a.connect(b.addrs[0])
            await a.host.wait_identified(b.peer_id)
            await go_connects_to(go, a)
            info = await a.host.wait_identified(go.peer_id)
            assert KAD not in info.protocols  # a client does not announce the protocol
            for _ in range(2):  # go's FIND_NODEs to A and B, after both identified go
                assert set(await go_closest_peers(go, timeout=10)) == {a.peer_id, b.peer_id}
            assert a.dht.counters["requests_in"] > 0
            for node in (a, b):
                assert node.dht.table.get(go.peer_id) is None
            assert a.dht.table.get(b.peer_id) is not None  # servers still are
