"""Circuit relay v2 over loopback: reservations, relayed connections, limits and refusals."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio

from conftest import full_addr
from lattice.errors import DialError, TransportError
from lattice.multiaddr import Multiaddr
from lattice.nat import circuit
from lattice.nat.circuit import CircuitListener, CircuitMessage
from lattice.nat.relay import RelayLimits, RelayServer
from lattice.transport import ping

ECHO = "/test/echo/1.0.0"


async def echo_handler(stream):
    while True:
        data = await stream.read(1 << 20)
        if not data:
            await stream.close()
            return
        await stream.write(data)


async def relay_setup(host_factory, limits: RelayLimits | None = None):
    """A relay R, a listener B with a reservation on R, a dialer A; returns (r, a, b, server, rsvp)."""
    r, a, b = await host_factory(), await host_factory(), await host_factory()
    server = RelayServer(r, limits)
    server.install()
    listener = CircuitListener(b)
    listener.install()
    circuit.install_dialer(a)  # what a node's NAT traversal does: the host dials /p2p-circuit
    b.set_stream_handler(ECHO, echo_handler)
    conn = await b.connect(full_addr(r))
    rsvp = await circuit.reserve(b, conn)
    listener.relays.add(r.peer_id)
    return r, a, b, server, rsvp


def circuit_addr(rsvp, target) -> Multiaddr:
    return rsvp.addrs[0].with_peer(target.peer_id)


async def test_reserve_dial_and_stream_over_a_relay(host_factory):
    r, a, b, server, rsvp = await relay_setup(host_factory)
    assert rsvp.relay == r.peer_id and rsvp.addrs and rsvp.expire > 0
    assert str(rsvp.addrs[0]).endswith(f"/p2p/{r.peer_id}/p2p-circuit")
    conn = await a.connect(circuit_addr(rsvp, b))
    assert conn.relayed and conn.remote_peer == b.peer_id
    assert (await a.wait_identified(b.peer_id)).agent_version.startswith("lattice/")
    assert len(await ping.ping(a, b.peer_id, count=3)) == 3
    payload = os.urandom(3 * 1024 * 1024 + 7)
    stream = await a.new_stream(b.peer_id, [ECHO])
    got = bytearray()

    async def reader():
        while True:
            chunk = await stream.read(1 << 20)
            if not chunk:
                return
            got.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await stream.write(payload)
        await stream.close()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert server.status()["circuits"] == 1 and server.stats["relayed_bytes"] >= 2 * len(payload)
    # the relayed connection ending frees the circuit on the relay
    await conn.close()
    with trio.fail_after(5):
        while server.status()["circuits"]:
            await trio.sleep(0.02)


async def test_connect_peer_falls_back_to_the_relayed_address(host_factory):
    _r, a, b, _server, rsvp = await relay_setup(host_factory)
    # B's direct address is a black hole (nothing answers), its relayed one works
    dead = Multiaddr.parse("/ip4/10.255.255.1/tcp/9")
    a.peerstore.add_addrs(b.peer_id, [dead, rsvp.addrs[0]], replace=True)
    start = trio.current_time()
    conn = await a.connect_peer(b.peer_id, timeout=5)
    assert conn.relayed and trio.current_time() - start < 2.0


async def test_dial_without_reservation_is_refused(host_factory):
    r, a, _b, server, rsvp = await relay_setup(host_factory)
    c = await host_factory()
    await c.connect(full_addr(r))  # connected to the relay but holds no reservation
    addr = rsvp.addrs[0].with_peer(c.peer_id)
    with pytest.raises(DialError, match="no reservation"):
        await a.connect(addr)
    assert server.stats["refused"] == 1


async def test_listener_refuses_circuits_from_relays_it_did_not_choose(host_factory):
    _r, a, b, _server, _rsvp = await relay_setup(host_factory)
    # a second relay that B is connected to but never reserved on cannot push circuits to B
    r2 = await host_factory()
    RelayServer(r2).install()
    await b.connect(full_addr(r2))
    server2_rsvp = await circuit.reserve(b, b.connection_to(r2.peer_id))  # reserved...
    assert server2_rsvp.addrs
    with pytest.raises(DialError, match="connection to the target failed"):  # ...but not accepted
        await a.connect(server2_rsvp.addrs[0].with_peer(b.peer_id))


async def test_reservation_limits(host_factory):
    limits = RelayLimits(max_reservations=2, max_reservations_per_ip=8)
    r = await host_factory()
    RelayServer(r, limits).install()
    peers = [await host_factory() for _ in range(3)]
    conns = [await p.connect(full_addr(r)) for p in peers]
    await circuit.reserve(peers[0], conns[0])
    await circuit.reserve(peers[1], conns[1])
    await circuit.reserve(peers[0], conns[0])  # renewing is always allowed
    with pytest.raises(DialError, match="resource limit exceeded"):
        await circuit.reserve(peers[2], conns[2])


async def test_circuit_byte_limit_resets_the_relayed_connection(host_factory):
    _r, a, b, _server, rsvp = await relay_setup(host_factory, RelayLimits(circuit_bytes=256 * 1024))
    conn = await a.connect(circuit_addr(rsvp, b))
    stream = await a.new_stream(conn, [ECHO])
    with pytest.raises(TransportError):  # the relay reset the circuit
        with trio.fail_after(10):
            await stream.write(os.urandom(1024 * 1024))
            while await stream.read(1 << 20):
                pass
    with trio.fail_after(5):
        while not conn.closed:
            await trio.sleep(0.02)


async def test_garbage_hop_requests_get_an_error_and_the_relay_keeps_serving(host_factory):
    r, a, b, _server, rsvp = await relay_setup(host_factory)
    await a.connect(full_addr(r))
    for junk in (b"\x05hello", b"\xff\xff\xff\xff\x0f", circuit.encode(CircuitMessage(7), hop=True)):
        stream = await a.new_stream(r.peer_id, [circuit.HOP])
        await stream.write(junk if junk[0] in (5, 0xFF) else bytes([len(junk)]) + junk)
        with trio.fail_after(5):
            try:
                reply = await circuit.read_message(stream, hop=True)
                assert reply.status in (circuit.MALFORMED_MESSAGE, circuit.UNEXPECTED_MESSAGE)
            except Exception:
                pass  # a reset is an acceptable answer to garbage
    conn = await a.connect(circuit_addr(rsvp, b))
    assert conn.relayed and len(await ping.ping(a, conn, count=2)) == 2


def test_message_round_trip_and_malformed_input():
    from lattice.identity import KeyPair

    peer = KeyPair.generate().peer_id
    msg = CircuitMessage(
        circuit.HOP_STATUS,
        peer=peer,
        peer_addrs=[Multiaddr.parse("/ip4/1.2.3.4/tcp/5")],
        expire=123456,
        reservation_addrs=[Multiaddr.parse("/ip4/1.2.3.4/tcp/5")],
        limit=circuit.Limit(60, 1 << 20),
        status=circuit.OK,
    )
    back = circuit.decode(circuit.encode(msg, hop=True), hop=True)
    assert back == msg
    stop = CircuitMessage(circuit.STOP_CONNECT, peer=peer, limit=circuit.Limit(5, 6))
    assert circuit.decode(circuit.encode(stop, hop=False), hop=False) == stop
    for junk in (b"", b"\x12\x03abc", b"\x08", os.urandom(64)):
        try:
            circuit.decode(junk, hop=True)
        except Exception as exc:
            from lattice.errors import ProtocolError

            assert isinstance(exc, ProtocolError)


async def test_hole_punch_upgrades_a_relayed_connection_to_a_direct_one(host_factory):
    from lattice.nat.dcutr import HolePuncher

    _r, a, b, server, rsvp = await relay_setup(host_factory)
    punchers = {}
    for h in (a, b):
        punchers[h] = HolePuncher(h, h.advertised_addrs, relayed_grace=0.5)
        punchers[h].install()
    relayed = await a.connect(circuit_addr(rsvp, b))
    assert relayed.relayed
    with trio.fail_after(10):
        while a.connection_to(b.peer_id) is None or a.connection_to(b.peer_id).relayed:
            await trio.sleep(0.02)
    direct = a.connection_to(b.peer_id)
    assert not direct.relayed and direct.direction == "outbound"  # A is the client, as the spec says
    with trio.fail_after(5):  # B records its outcome when its side of the handshake completes
        while a.peer_id not in punchers[b].results:
            await trio.sleep(0.02)
    assert punchers[b].results[a.peer_id]["outcome"] == "direct"
    stream = await a.new_stream(b.peer_id, [ECHO])
    await stream.write(b"over the punched path")
    assert await stream.read_exactly(21) == b"over the punched path"
    with trio.fail_after(5):  # the relayed connection is retired after its grace period
        while not relayed.closed:
            await trio.sleep(0.05)
    assert server.status()["circuits"] == 0 or not relayed.session.num_streams


async def test_hole_punch_failure_is_recorded_and_the_relay_keeps_working(host_factory):
    from lattice.nat.dcutr import HolePuncher

    _r, a, b, _server, rsvp = await relay_setup(host_factory)
    dead = [Multiaddr.parse("/ip4/10.255.255.1/tcp/9")]  # addresses nobody can reach (a symmetric NAT)
    HolePuncher(a, lambda: dead, dial_timeout=0.3).install()
    pb = HolePuncher(b, lambda: dead, attempts=2, dial_timeout=0.3)
    pb.install()
    relayed = await a.connect(circuit_addr(rsvp, b))
    with trio.fail_after(10):
        while a.peer_id not in pb.results:
            await trio.sleep(0.05)
    assert pb.results[a.peer_id]["outcome"].startswith("failed")
    assert a.connection_to(b.peer_id) is relayed and not relayed.closed
    assert len(await ping.ping(a, b.peer_id, count=2)) == 2


async def test_connect_by_peer_id_falls_back_to_the_relays_we_share(host_factory):
    """A knows only a dead address of B and no router finds better: A tries B through the relay A
    itself is reserved on (a swarm's NATed peers share their bootstrap relays)."""
    r, a, b, _server, _rsvp = await relay_setup(host_factory)
    a_conn = await a.connect(full_addr(r))
    a_rsvp = await circuit.reserve(a, a_conn)
    a.add_address_source(lambda: list(a_rsvp.addrs))  # A advertises its relayed address, as autorelay does
    dead = Multiaddr.parse("/ip4/127.0.0.1/tcp/1")
    a.peerstore.add_addrs(b.peer_id, [dead], replace=True)
    with trio.fail_after(10):
        conn = await a.connect_peer(b.peer_id, timeout=5)
    assert conn.relayed and conn.remote_peer == b.peer_id
    stream = await a.new_stream(b.peer_id, [ECHO])
    await stream.write(b"via the shared relay")
    assert await stream.read_exactly(20) == b"via the shared relay"


async def test_relay_fallback_also_when_the_router_finds_only_dead_direct_addresses(host_factory):
    """The test_nat flake: the DHT answered with B's direct addresses only (its relayed address not
    propagated yet), all unreachable; the shared relay must still be tried."""
    r, a, b, _server, _rsvp = await relay_setup(host_factory)
    a_conn = await a.connect(full_addr(r))
    a_rsvp = await circuit.reserve(a, a_conn)
    a.add_address_source(lambda: list(a_rsvp.addrs))
    a.peerstore.add_addrs(b.peer_id, [Multiaddr.parse("/ip4/127.0.0.1/tcp/1")], replace=True)

    async def router(peer):
        return [Multiaddr.parse("/ip4/127.0.0.1/tcp/2")]

    a.peer_router = router
    with trio.fail_after(10):
        conn = await a.connect_peer(b.peer_id, timeout=5)
    assert conn.relayed and conn.remote_peer == b.peer_id


def test_relay_candidates_spread_over_prefixes():
    from lattice.nat.autorelay import spread_by_prefix

    crowd = [Multiaddr.parse(f"/ip4/203.0.113.{i}/tcp/4001") for i in range(1, 6)]
    lone = [Multiaddr.parse("/ip4/198.51.100.9/tcp/4001"), Multiaddr.parse("/ip6/2001:db8::1/tcp/4001")]
    out = spread_by_prefix([*crowd, *lone])
    assert out[:3] == [crowd[0], *lone] and sorted(map(str, out)) == sorted(map(str, crowd + lone))


def test_punch_targets_are_few_unicast_tcp_addresses():
    from lattice.nat.dcutr import punch_targets

    addrs = [Multiaddr.parse(a) for a in (
        "/ip4/0.0.0.0/tcp/4001", "/ip4/224.0.0.1/tcp/4001", "/ip4/255.255.255.255/tcp/1",
        "/ip4/1.2.3.4/tcp/0", "/ip4/1.2.3.4/tcp/4001", "/ip4/1.2.3.4/tcp/4001", "/ip4/10.0.0.2/tcp/4001",
        "/ip6/::1/tcp/4001",
        "/ip4/5.6.7.8/tcp/4001", "/ip4/9.9.9.9/tcp/4001",
    )]  # fmt: skip
    assert [str(a) for a in punch_targets(addrs, 4)] == [
        "/ip4/1.2.3.4/tcp/4001", "/ip4/10.0.0.2/tcp/4001", "/ip6/::1/tcp/4001", "/ip4/5.6.7.8/tcp/4001",
    ]  # fmt: skip


async def test_hole_punch_requests_over_a_direct_connection_are_refused(host_factory):
    from lattice.nat import dcutr

    a, b = await host_factory(), await host_factory()
    puncher = dcutr.HolePuncher(a, a.advertised_addrs)
    puncher.install()
    conn = await b.connect(full_addr(a))
    stream = await b.new_stream(conn, [dcutr.PROTOCOL_ID])
    with pytest.raises(TransportError), trio.fail_after(5):  # reset: no dial to what we name
        await stream.write(dcutr.encode(dcutr.CONNECT, [Multiaddr.parse("/ip4/127.0.0.1/tcp/1")]))
        await dcutr.read(stream, dcutr.CONNECT)
    assert puncher.refused == 1


async def test_an_idle_circuit_is_closed(host_factory):
    _r, a, b, server, rsvp = await relay_setup(host_factory, RelayLimits(circuit_idle=0.5))
    conn = await a.connect(circuit_addr(rsvp, b))
    assert len(await ping.ping(a, conn, count=1)) == 1
    with trio.fail_after(5):  # no byte either way for 0.5 s (no keepalive on bare hosts)
        while not conn.closed:
            await trio.sleep(0.05)
    assert server.status()["idle_closed"] == 1


async def test_a_relay_cannot_push_unbounded_pending_circuits(host_factory):
    """A relay we reserved on (anyone can run one) opens 24 circuits whose dialer never speaks."""
    relay, b = await host_factory(), await host_factory()
    listener = CircuitListener(b, max_pending=16)
    listener.install()
    listener.relays.add(relay.peer_id)
    conn = await relay.connect(full_addr(b))
    answers = []

    async def stop_request():
        stream = await relay.new_stream(conn, [circuit.STOP])
        msg = CircuitMessage(circuit.STOP_CONNECT, peer=relay.peer_id)
        await circuit.write_message(stream, msg, hop=False)
        answers.append((await circuit.read_message(stream, hop=False)).status)

    async with trio.open_nursery() as nursery:
        for _ in range(24):
            nursery.start_soon(stop_request)
    assert answers.count(circuit.OK) == 16 and answers.count(circuit.RESOURCE_LIMIT_EXCEEDED) == 8
    assert listener.pending == 16


async def test_a_circuits_buffers_are_charged_to_the_node_budget(host_factory):
    r, a, b, server, rsvp = await relay_setup(host_factory, RelayLimits(buffer=64 * 1024))
    conn = await a.connect(circuit_addr(rsvp, b))
    assert r.resources.stats()["services"]["relay"]["memory"] == 2 * 64 * 1024
    await conn.close()
    with trio.fail_after(5):
        while server.status()["circuits"]:
            await trio.sleep(0.02)
    assert r.resources.stats()["services"]["relay"]["memory"] == 0
