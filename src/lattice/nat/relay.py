"""Circuit relay v2, the relay side (``lattice-node run --relay``): reservations and relayed circuits.

A public node lends its reachability to private ones: a private peer reserves a slot, and others
reach it through us. Everything is bounded because a relay open to strangers is a resource to
protect: reservations in all, per IP and per IP prefix (/24, /48), each one only while its peer
stays connected; circuits in all, per source prefix, per peer, per (source, target) pair and per
(source prefix, target), counted before the target is asked, so a burst of CONNECTs cannot pass a
cap and one stranger cannot take all the circuits of the peer it targets; seconds, bytes and idle
seconds per circuit; and the copy buffers of a circuit are reserved from the node's memory budget
(resource manager, service "relay") before it opens. The bytes we forward are the two ends' Noise
ciphertext: a relay cannot read or alter them.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass

import trio

from lattice.errors import TransportError
from lattice.identity import PeerId
from lattice.multiaddr import Multiaddr
from lattice.nat import circuit
from lattice.nat.circuit import CircuitMessage, Limit, read_message, write_message
from lattice.transport.host import Connection, Host
from lattice.transport.limits import ip_prefix
from lattice.transport.resources import ResourceLimitExceeded
from lattice.transport.stream import Stream

log = logging.getLogger(__name__)


@dataclass
class RelayLimits:
    """What one relay gives away. Circuits last long enough to carry real traffic for peers that
    cannot hole-punch (symmetric NATs), unlike go-libp2p's 2 min / 128 KiB punch-only default."""

    max_reservations: int = 128
    max_reservations_per_ip: int = 8
    max_reservations_per_prefix: int = 16  # one /24 (/48) cannot take the relay's slots
    reservation_ttl: int = 3600
    max_circuits: int = 64
    max_circuits_per_peer: int = 8  # as either end
    max_circuits_per_pair: int = 2  # from one source to one target
    max_circuits_per_prefix: int = 16  # from sources of one /24 (/48)
    max_circuits_per_prefix_to_peer: int = 4  # from sources of one prefix to one target
    circuit_duration: int = 3600
    circuit_bytes: int = 1 << 30  # per direction
    circuit_idle: float = 120.0  # seconds without a byte either way (keepalives pass every 30 s)
    buffer: int = 256 * 1024


def circuit_refusal(
    limits: RelayLimits, counts: Counter, src: Hashable, dst: Hashable, src_prefix: str | None
) -> str | None:
    """The cap a new circuit from ``src`` (of ``src_prefix``; None: exempt) to ``dst`` would pass, or
    None. ``counts`` holds open circuits by key: "*", peer, (src, dst), prefix, (prefix, dst)."""
    checks = [
        ("*", limits.max_circuits, "circuits"),
        (src, limits.max_circuits_per_peer, "circuits of the source"),
        (dst, limits.max_circuits_per_peer, "circuits of the target"),
        ((src, dst), limits.max_circuits_per_pair, "circuits from the source to the target"),
    ]
    if src_prefix is not None:
        checks += [
            (src_prefix, limits.max_circuits_per_prefix, "circuits of the source's network"),
            ((src_prefix, dst), limits.max_circuits_per_prefix_to_peer, "circuits of its network to it"),
        ]
    for key, cap, what in checks:
        if counts[key] >= cap:
            return what
    return None


@dataclass
class _Slot:
    expire: float
    ip: str
    prefix: str | None


class _LimitReached(Exception):
    pass


class RelayServer:
    """The hop protocol handler; install on a host that others can reach directly."""

    def __init__(self, host: Host, limits: RelayLimits | None = None) -> None:
        self.host = host
        self.limits = limits or RelayLimits()
        self.reservations: dict[PeerId, _Slot] = {}
        # open circuits (and those being set up) by key: "*", peer, (src, dst), prefix, (prefix, dst)
        self.circuits: Counter = Counter()
        self.stats: Counter[str] = Counter()
        self.serving = True

    @property
    def open_circuits(self) -> int:
        return self.circuits["*"]

    def install(self) -> None:
        self.host.set_stream_handler(circuit.HOP, self._handle_hop)
        self.host.on_disconnect(self._on_disconnect)

    def set_serving(self, serving: bool) -> None:
        """Offer the hop protocol or not: a relay found unreachable (behind a NAT) stops, so peers
        do not pick it (identify lists the protocols we serve); its reservations go, since nobody
        could dial them. Circuits already open run on."""
        if serving == self.serving:
            return
        self.serving = serving
        if serving:
            self.host.set_stream_handler(circuit.HOP, self._handle_hop)
        else:
            self.host.remove_stream_handler(circuit.HOP)
            self.reservations.clear()

    def _on_disconnect(self, conn: Connection) -> None:
        """A reservation lasts only while its peer is connected: circuits need that connection, and
        a reservation left behind would hold a slot for its whole lifetime."""
        if conn.remote_peer in self.reservations and self.host.connection_to(conn.remote_peer) is None:
            del self.reservations[conn.remote_peer]

    def _prefix(self, ip: str) -> str | None:
        """The network a stranger's budget counts against (None: an exempt address, e.g. loopback)."""
        return None if ip in self.host.resources.limits.exempt_ips else ip_prefix(ip)

    def status(self) -> dict:
        now = time.time()
        return {
            "serving": self.serving,
            "reservations": sum(1 for s in self.reservations.values() if s.expire > now),
            "circuits": self.open_circuits,
            "relayed_bytes": self.stats["relayed_bytes"],
            "refused": self.stats["refused"],
            "idle_closed": self.stats["idle_closed"],
        }

    async def _reply(self, stream: Stream, status: int, **fields) -> None:
        if status != circuit.OK:
            self.stats["refused"] += 1
        await write_message(stream, CircuitMessage(circuit.HOP_STATUS, status=status, **fields), hop=True)

    async def _handle_hop(self, stream: Stream) -> None:
        peer = stream.remote_peer
        conn = self.host.connection_to(peer)
        try:
            with trio.fail_after(circuit.TIMEOUT):
                msg = await read_message(stream, hop=True)
        except (trio.TooSlowError, TransportError) as exc:
            log.debug("bad hop request from %s: %s", peer, exc)
            await self._reply(stream, circuit.MALFORMED_MESSAGE)
            return
        if conn is None or conn.relayed:
            await self._reply(stream, circuit.PERMISSION_DENIED)  # no relaying over relays
            return
        if msg.type == circuit.RESERVE:
            await self._reserve(stream, peer, conn.remote_addr.ip or "")
        elif msg.type == circuit.CONNECT and msg.peer is not None:
            await self._connect(stream, peer, msg.peer, self._prefix(conn.remote_addr.ip or ""))
        else:
            await self._reply(stream, circuit.UNEXPECTED_MESSAGE)

    def _expire(self) -> None:
        now = time.time()
        for peer in [p for p, s in self.reservations.items() if s.expire <= now]:
            del self.reservations[peer]

    async def _reserve(self, stream: Stream, peer: PeerId, ip: str) -> None:
        self._expire()
        limits = self.limits
        renewing = peer in self.reservations
        prefix = self._prefix(ip)
        others = [s for p, s in self.reservations.items() if p != peer]
        same_ip = sum(1 for s in others if s.ip == ip)
        same_prefix = sum(1 for s in others if prefix is not None and s.prefix == prefix)
        if (
            (not renewing and len(self.reservations) >= limits.max_reservations)
            or same_ip >= limits.max_reservations_per_ip
            or same_prefix >= limits.max_reservations_per_prefix
        ):
            await self._reply(stream, circuit.RESOURCE_LIMIT_EXCEEDED)
            return
        expire = int(time.time()) + limits.reservation_ttl
        self.reservations[peer] = _Slot(expire, ip, prefix)
        self.stats["reservations"] += 1
        addrs = self._public_addrs(ip)
        await self._reply(
            stream,
            circuit.OK,
            expire=expire,
            reservation_addrs=addrs,
            limit=Limit(limits.circuit_duration, limits.circuit_bytes),
        )
        # We know the peer's relayed address now; peers asking the DHT for it should not have to wait
        # for its identify push.
        self.host.peerstore.add_addrs(peer, [a.circuit() for a in addrs])

    def _public_addrs(self, requester_ip: str) -> list[Multiaddr]:
        """Our direct addresses as the reserving peer can use them (no loopback for remote peers)."""
        try:
            remote_is_loopback = ipaddress.ip_address(requester_ip).is_loopback
        except ValueError:
            remote_is_loopback = False
        addrs = [a for a in self.host.advertised_addrs() if a.tcp_target() and not a.is_relayed]
        if not remote_is_loopback:
            addrs = [a for a in addrs if not a.is_loopback()]
        return [a.with_peer(self.host.peer_id) for a in addrs]

    async def _connect(self, stream: Stream, src: PeerId, dst: PeerId, src_prefix: str | None) -> None:
        self._expire()
        if dst not in self.reservations:
            await self._reply(stream, circuit.NO_RESERVATION)
            return
        refusal = circuit_refusal(self.limits, self.circuits, src, dst, src_prefix)
        if refusal is not None:
            log.debug("circuit %s -> %s refused: %s", src, dst, refusal)
            await self._reply(stream, circuit.RESOURCE_LIMIT_EXCEEDED)
            return
        keys = ["*", src, dst, (src, dst), *((src_prefix, (src_prefix, dst)) if src_prefix else ())]
        lease = self.host.resources.lease(src, "relay")
        try:
            lease.grow(2 * self.limits.buffer)  # the copy buffers, both ways
        except ResourceLimitExceeded as exc:
            log.debug("circuit %s -> %s refused: %s", src, dst, exc)
            await self._reply(stream, circuit.RESOURCE_LIMIT_EXCEEDED)
            return
        self.circuits.update(keys)  # counted now: concurrent CONNECTs must see each other
        try:
            with lease:
                await self._open(stream, src, dst)
        finally:
            self.circuits.subtract(keys)
            for key in keys:
                if self.circuits[key] <= 0:
                    del self.circuits[key]

    async def _open(self, stream: Stream, src: PeerId, dst: PeerId) -> None:
        limits = self.limits
        dst_conn = self.host.connection_to(dst)
        if dst_conn is None or dst_conn.relayed:
            await self._reply(stream, circuit.CONNECTION_FAILED)
            return
        limit = Limit(limits.circuit_duration, limits.circuit_bytes)
        try:
            with trio.fail_after(circuit.TIMEOUT):
                dst_stream = await self.host.new_stream(dst_conn, [circuit.STOP])
                try:
                    await write_message(
                        dst_stream, CircuitMessage(circuit.STOP_CONNECT, peer=src, limit=limit), hop=False
                    )
                    answer = await read_message(dst_stream, hop=False)
                except BaseException:
                    await dst_stream.reset()
                    raise
        except (trio.TooSlowError, TransportError) as exc:
            log.debug("stop request to %s failed: %s", dst, exc)
            await self._reply(stream, circuit.CONNECTION_FAILED)
            return
        if answer.type != circuit.STOP_STATUS or answer.status != circuit.OK:
            await dst_stream.reset()
            await self._reply(stream, circuit.CONNECTION_FAILED)
            return
        await self._reply(stream, circuit.OK, limit=limit)
        self.stats["circuits"] += 1
        await self._bridge(stream, dst_stream)

    async def _bridge(self, a: Stream, b: Stream) -> None:
        """Copy both ways until both ends finish; a limit, an error or ``circuit_idle`` seconds
        without a byte either way reset both streams."""
        limits = self.limits
        failed = False
        idle = limits.circuit_idle or float("inf")

        async def pipe(src: Stream, dst: Stream) -> None:
            nonlocal failed
            sent = 0
            try:
                while True:
                    data = await src.read(limits.buffer)
                    if not data:
                        await dst.close()
                        return
                    watchdog.deadline = trio.current_time() + idle
                    sent += len(data)
                    if limits.circuit_bytes and sent > limits.circuit_bytes:
                        raise _LimitReached
                    await dst.write(data)
                    self.stats["relayed_bytes"] += len(data)
            except (TransportError, _LimitReached):
                failed = True
                nursery.cancel_scope.cancel()

        with trio.move_on_after(limits.circuit_duration or float("inf")) as scope:
            with trio.CancelScope(deadline=trio.current_time() + idle) as watchdog:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pipe, a, b)
                    nursery.start_soon(pipe, b, a)
        if watchdog.cancelled_caught:
            self.stats["idle_closed"] += 1
        if failed or scope.cancelled_caught or watchdog.cancelled_caught:
            await a.reset()
            await b.reset()


__all__ = ["RelayLimits", "RelayServer"]
