"""Wire compatibility with another libp2p implementation (py-libp2p 0.8.1), both directions."""

from __future__ import annotations

import hashlib
from contextlib import asynccontextmanager

import pytest
import trio

from conftest import full_addr

libp2p = pytest.importorskip("libp2p", reason="py-libp2p (the interop reference) is not installed")
from libp2p import new_host  # noqa: E402
from libp2p.crypto.ed25519 import create_new_key_pair  # noqa: E402
from libp2p.host.ping import PingService  # noqa: E402
from libp2p.kad_dht import KadDHT  # noqa: E402
from libp2p.kad_dht.kad_dht import DHTMode  # noqa: E402
from libp2p.peer.peerinfo import info_from_p2p_addr  # noqa: E402
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol  # noqa: E402
from libp2p.relay.circuit_v2.resources import RelayLimits as PyRelayLimits  # noqa: E402
from libp2p.tools.anyio_service import background_trio_service  # noqa: E402
from multiaddr import Multiaddr as PyMultiaddr  # noqa: E402

from lattice import Node, NodeConfig  # noqa: E402
from lattice.dht import DHT  # noqa: E402
from lattice.identity import PeerId  # noqa: E402
from lattice.multiaddr import Multiaddr  # noqa: E402
from lattice.nat import circuit  # noqa: E402
from lattice.nat.circuit import CircuitListener  # noqa: E402
from lattice.transport import ping  # noqa: E402

pytestmark = pytest.mark.interop
KAD = "/ipfs/kad/1.0.0"


async def test_pylibp2p_dials_us_identifies_and_pings(host_factory):
    ours = await host_factory()
    theirs = new_host(key_pair=create_new_key_pair())
    async with theirs.run(listen_addrs=[PyMultiaddr("/ip4/127.0.0.1/tcp/0")]):
        with trio.fail_after(15):
            await theirs.connect(info_from_p2p_addr(PyMultiaddr(str(full_addr(ours)))))
            rtts = await PingService(theirs).ping(ours.peer_id and _py_id(ours.peer_id), ping_amt=3)
            assert len(rtts) == 3
            their_id = PeerId.from_string(theirs.get_id().to_base58())
            info = await ours.wait_identified(their_id)
            assert "/ipfs/ping/1.0.0" in info.protocols
            assert info.public_key is not None and info.public_key.peer_id() == their_id
            conn = ours.connection_to(their_id)
            assert conn is not None and conn.direction == "inbound"


async def test_we_dial_pylibp2p_identify_and_ping(host_factory):
    ours = await host_factory()
    theirs = new_host(key_pair=create_new_key_pair())
    async with theirs.run(listen_addrs=[PyMultiaddr("/ip4/127.0.0.1/tcp/0")]):
        addr = f"{theirs.get_addrs()[0]}"
        if "/p2p/" not in addr:
            addr += f"/p2p/{theirs.get_id().to_base58()}"
        with trio.fail_after(15):
            conn = await ours.connect(addr)
            info = await ours.wait_identified(conn.remote_peer)
            assert info.agent_version  # py-libp2p sent its agent string
            assert any(a.tcp_target() for a in info.addrs)
            rtts = await ping.ping(ours, conn.remote_peer, count=5)
            assert len(rtts) == 5 and all(r > 0 for r in rtts)


def _py_id(peer: PeerId):
    from libp2p.peer.id import ID

    return ID(peer.multihash)


# -- Kademlia with py-libp2p's KadDHT (/ipfs/kad/1.0.0): the libp2p profile, as a user would pick


@asynccontextmanager
async def lattice_node(tmp_path, name: str):
    cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / name, control=False, swarm="libp2p")
    async with Node(cfg, services=[DHT()]) as node:
        assert node.dht.protocol_id == KAD
        yield node


@asynccontextmanager
async def py_dht_peer():
    """A py-libp2p host with its Kademlia in server mode."""
    host = new_host(key_pair=create_new_key_pair())
    async with host.run(listen_addrs=[PyMultiaddr("/ip4/127.0.0.1/tcp/0")]):
        dht = KadDHT(host, DHTMode.SERVER)
        async with background_trio_service(dht):
            yield host, dht


def py_addr(host) -> str:
    addr = str(host.get_addrs()[0])
    return addr if "/p2p/" in addr else f"{addr}/p2p/{host.get_id().to_base58()}"


async def py_connect(host, dht, node) -> None:
    """py dials a Lattice node and takes it into its routing table once identify says it serves."""
    await host.connect(info_from_p2p_addr(PyMultiaddr(node.addrs[0])))
    peer = _py_id(node.peer_id)
    with trio.fail_after(10):
        while not await dht.add_peer(peer):
            await trio.sleep(0.05)


async def test_pylibp2p_finds_a_third_peer_through_us(tmp_path):
    async with (
        lattice_node(tmp_path, "a") as a,
        lattice_node(tmp_path, "b") as b,
        py_dht_peer() as (host, dht),
    ):
        with trio.fail_after(20):
            await a.connect(b.addrs[0])
            await a.host.wait_identified(b.peer_id)
            await py_connect(host, dht, a)  # py knows only A
            found = await dht.find_peer(_py_id(b.peer_id))  # FIND_NODE to A, which knows B
            assert found is not None and str(found.peer_id) == str(b.peer_id)
            assert b.addrs[0].split("/p2p/")[0] in [str(x) for x in found.addrs]
            assert a.dht.counters["requests_in"] > 0 and a.dht.counters["malformed"] == 0


async def test_we_find_a_third_peer_through_pylibp2p(tmp_path):
    async with lattice_node(tmp_path, "a") as a, py_dht_peer() as (h1, d1), py_dht_peer() as (h2, _d2):
        with trio.fail_after(20):
            await h2.connect(info_from_p2p_addr(PyMultiaddr(py_addr(h1))))
            while not await d1.add_peer(h2.get_id()):
                await trio.sleep(0.05)
            await a.connect(py_addr(h1))  # we know only py1
            await a.host.wait_identified(PeerId.from_string(h1.get_id().to_base58()))
            target = PeerId.from_string(h2.get_id().to_base58())
            addrs = await a.dht.find_peer(target)  # FIND_NODE to py1, which knows py2
            assert str(h2.get_addrs()[0]).split("/p2p/")[0] in [str(x.without_peer()) for x in addrs]
            assert await a.connect(str(target)) == str(target)  # and dial it by id


async def test_providers_both_ways_with_pylibp2p(tmp_path):
    async with lattice_node(tmp_path, "a") as a, py_dht_peer() as (host, dht):
        with trio.fail_after(20):
            await py_connect(host, dht, a)
            await a.host.wait_identified(PeerId.from_string(host.get_id().to_base58()))
            key = hashlib.sha256(b"provided by py-libp2p").digest()
            assert await dht.provide(key.hex())  # py: a hex key is the key's bytes
            providers = await a.dht.find_providers(key)
            assert host.get_id().to_base58() in [p for p, _ in providers]
            key = hashlib.sha256(b"provided by lattice").digest()
            assert await a.dht.provide(key) >= 1
            found = await dht.find_providers(key.hex(), count=1)
            assert [str(p.peer_id) for p in found] == [str(a.peer_id)]


async def test_pylibp2p_values_are_refused_and_both_keep_serving(tmp_path):
    """Values do not cross: py's PUT_VALUE of its own (unsigned) record is refused with a reset, as
    go's server refuses a record it does not validate; py goes on, and so does our node."""
    async with lattice_node(tmp_path, "a") as a, py_dht_peer() as (host, dht):
        with trio.fail_after(20):
            await py_connect(host, dht, a)
            await a.host.wait_identified(PeerId.from_string(host.get_id().to_base58()))
            await dht.put_value("py-key", b"py value")  # stored locally by py; ours refuses it
            assert a.dht.counters["rejected_records"] >= 1 and a.dht.store.record_count == 0
            assert await a.dht.get(b"py-key") == []  # py's plain value is not a Lattice record
            rtts = await ping.ping(a.host, PeerId.from_string(host.get_id().to_base58()), count=2)
            assert len(rtts) == 2
            key = hashlib.sha256(b"after the refused put").digest()
            assert await a.dht.provide(key) >= 1


# -- circuit relay v2: py-libp2p's relay server between two Lattice hosts


async def test_relay_v2_through_a_pylibp2p_relay(host_factory):
    """B reserves a slot on py-libp2p's relay (HOP RESERVE), A dials B through it (HOP CONNECT, then
    py's STOP to B): identify and ping over the relayed connection."""
    a, b = await host_factory(), await host_factory()
    relay = new_host(key_pair=create_new_key_pair())
    async with relay.run(listen_addrs=[PyMultiaddr("/ip4/127.0.0.1/tcp/0")]):
        limits = PyRelayLimits(duration=60, data=1 << 20, max_circuit_conns=4, max_reservations=4)
        async with background_trio_service(CircuitV2Protocol(relay, limits=limits, allow_hop=True)):
            listener = CircuitListener(b)
            listener.install()
            circuit.install_dialer(a)
            with trio.fail_after(15):
                conn = await b.connect(py_addr(relay))
                rsvp = await circuit.reserve(b, conn)
                listener.relays.add(conn.remote_peer)
                assert rsvp.relay == conn.remote_peer and rsvp.expire > 0
                target = Multiaddr.parse(f"{py_addr(relay)}/p2p-circuit/p2p/{b.peer_id}")
                relayed = await a.connect(target)
                assert relayed.relayed and relayed.remote_peer == b.peer_id
                assert (await a.wait_identified(b.peer_id)).agent_version.startswith("lattice/")
                assert len(await ping.ping(a, b.peer_id, count=3)) == 3
