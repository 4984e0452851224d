"""Circuit relay v2, the relay side (``lattice-node run --relay``): reservations and relayed circuits.

A public node lends its reachability to private ones: a private peer reserves a slot, and others
reach it through us. Everything is bounded (reservations in all and per IP, circuits in all and per
peer, seconds and bytes per circuit) because a relay open to strangers is a resource to protect.
The bytes we forward are the two ends' Noise ciphertext: a relay cannot read or alter them.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import Counter
from dataclasses import dataclass

import trio

from lattice.errors import TransportError
from lattice.identity import PeerId
from lattice.multiaddr import Multiaddr
from lattice.nat import circuit
from lattice.nat.circuit import CircuitMessage, Limit, read_message, write_message
from lattice.transport.host import Host
from lattice.transport.yamux import YamuxStream

log = logging.getLogger(__name__)


@dataclass
class RelayLimits:
    """What one relay gives away. Circuits last long enough to carry real traffic for peers that
    cannot hole-punch (symmetric NATs), unlike go-libp2p's 2 min / 128 KiB punch-only default."""

    max_reservations: int = 128
    max_reservations_per_ip: int = 8
    reservation_ttl: int = 3600
    max_circuits: int = 64
    max_circuits_per_peer: int = 8
    circuit_duration: int = 3600
    circuit_bytes: int = 1 << 30  # per direction
    buffer: int = 256 * 1024


@dataclass
class _Slot:
    expire: float
    ip: str


class _LimitReached(Exception):
    pass


class RelayServer:
    """The hop protocol handler; install on a host that others can reach directly."""

    def __init__(self, host: Host, limits: RelayLimits | None = None) -> None:
        self.host = host
        self.limits = limits or RelayLimits()
        self.reservations: dict[PeerId, _Slot] = {}
        self.circuits: Counter[PeerId] = Counter()  # open circuits per peer (either end)
        self.open_circuits = 0
        self.stats: Counter[str] = Counter()

    def install(self) -> None:
        self.host.set_stream_handler(circuit.HOP, self._handle_hop)

    def status(self) -> dict:
        now = time.time()
        return {
            "reservations": sum(1 for s in self.reservations.values() if s.expire > now),
            "circuits": self.open_circuits,
            "relayed_bytes": self.stats["relayed_bytes"],
            "refused": self.stats["refused"],
        }

    async def _reply(self, stream: YamuxStream, status: int, **fields) -> None:
        if status != circuit.OK:
            self.stats["refused"] += 1
        await write_message(stream, CircuitMessage(circuit.HOP_STATUS, status=status, **fields), hop=True)

    async def _handle_hop(self, stream: YamuxStream) -> None:
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
            await self._connect(stream, peer, msg.peer)
        else:
            await self._reply(stream, circuit.UNEXPECTED_MESSAGE)

    def _expire(self) -> None:
        now = time.time()
        for peer in [p for p, s in self.reservations.items() if s.expire <= now]:
            del self.reservations[peer]

    async def _reserve(self, stream: YamuxStream, peer: PeerId, ip: str) -> None:
        self._expire()
        limits = self.limits
        renewing = peer in self.reservations
        same_ip = sum(1 for p, s in self.reservations.items() if s.ip == ip and p != peer)
        if not renewing and len(self.reservations) >= limits.max_reservations:
            await self._reply(stream, circuit.RESOURCE_LIMIT_EXCEEDED)
            return
        if same_ip >= limits.max_reservations_per_ip:
            await self._reply(stream, circuit.RESOURCE_LIMIT_EXCEEDED)
            return
        expire = int(time.time()) + limits.reservation_ttl
        self.reservations[peer] = _Slot(expire, ip)
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

    async def _connect(self, stream: YamuxStream, src: PeerId, dst: PeerId) -> None:
        self._expire()
        limits = self.limits
        if dst not in self.reservations:
            await self._reply(stream, circuit.NO_RESERVATION)
            return
        if (
            self.open_circuits >= limits.max_circuits
            or self.circuits[src] >= limits.max_circuits_per_peer
            or self.circuits[dst] >= limits.max_circuits_per_peer
        ):
            await self._reply(stream, circuit.RESOURCE_LIMIT_EXCEEDED)
            return
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
        self.open_circuits += 1
        self.circuits[src] += 1
        self.circuits[dst] += 1
        self.stats["circuits"] += 1
        try:
            await self._bridge(stream, dst_stream)
        finally:
            self.open_circuits -= 1
            for peer in (src, dst):
                self.circuits[peer] -= 1
                if self.circuits[peer] <= 0:
                    del self.circuits[peer]

    async def _bridge(self, a: YamuxStream, b: YamuxStream) -> None:
        """Copy both ways until both ends finish; a limit or error resets both streams."""
        limits = self.limits
        failed = False

        async def pipe(src: YamuxStream, dst: YamuxStream) -> None:
            nonlocal failed
            sent = 0
            try:
                while True:
                    data = await src.read(limits.buffer)
                    if not data:
                        await dst.close()
                        return
                    sent += len(data)
                    if limits.circuit_bytes and sent > limits.circuit_bytes:
                        raise _LimitReached
                    await dst.write(data)
                    self.stats["relayed_bytes"] += len(data)
            except (TransportError, _LimitReached):
                failed = True
                nursery.cancel_scope.cancel()

        with trio.move_on_after(limits.circuit_duration or float("inf")) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pipe, a, b)
                nursery.start_soon(pipe, b, a)
        if failed or scope.cancelled_caught:
            await a.reset()
            await b.reset()


__all__ = ["RelayLimits", "RelayServer"]
