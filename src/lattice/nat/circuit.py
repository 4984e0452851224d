"""Circuit relay v2, the client side: reserve a slot on a relay, dial through one, accept circuits.

Wire format and protocol ids are libp2p's (specs/relay/circuit-v2.md): uvarint-delimited protobuf
``HopMessage`` on ``/libp2p/circuit/relay/0.2.0/hop`` (us -> relay) and ``StopMessage`` on
``.../stop`` (relay -> us). Once a circuit is open, the relayed stream is upgraded like a TCP socket
(Noise, then Yamux): the relay sees only ciphertext, and the connection is a host connection like
any other, so every service (RPC, DHT, CRDT) runs over it; ``Connection.relayed`` tells them apart.
The relay server is :mod:`lattice.nat.relay`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import trio

from lattice import _proto
from lattice.errors import DialError, LatticeError, ProtocolError, StreamError, TransportError
from lattice.identity import PeerId
from lattice.multiaddr import Multiaddr, MultiaddrError
from lattice.transport.framing import read_delimited
from lattice.transport.host import Connection, Host
from lattice.transport.stream import Stream

log = logging.getLogger(__name__)

HOP = "/libp2p/circuit/relay/0.2.0/hop"
STOP = "/libp2p/circuit/relay/0.2.0/stop"
MAX_MESSAGE = 4096
MAX_ADDRS = 16
TIMEOUT = 10.0

# HopMessage.Type / StopMessage.Type
RESERVE, CONNECT, HOP_STATUS = 0, 1, 2
STOP_CONNECT, STOP_STATUS = 0, 1

OK = 100
RESERVATION_REFUSED = 200
RESOURCE_LIMIT_EXCEEDED = 201
PERMISSION_DENIED = 202
CONNECTION_FAILED = 203
NO_RESERVATION = 204
MALFORMED_MESSAGE = 400
UNEXPECTED_MESSAGE = 401
STATUS_NAMES = {
    OK: "OK",
    RESERVATION_REFUSED: "reservation refused",
    RESOURCE_LIMIT_EXCEEDED: "resource limit exceeded",
    PERMISSION_DENIED: "permission denied",
    CONNECTION_FAILED: "connection to the target failed",
    NO_RESERVATION: "the target has no reservation on this relay",
    MALFORMED_MESSAGE: "malformed message",
    UNEXPECTED_MESSAGE: "unexpected message",
}


@dataclass
class Limit:
    """Per-circuit limits the relay enforces: seconds and bytes per direction (0 = none)."""

    duration: int = 0
    data: int = 0


@dataclass
class CircuitMessage:
    """A HopMessage or StopMessage (they share the fields we use; numbering differs)."""

    type: int
    peer: PeerId | None = None
    peer_addrs: list[Multiaddr] = field(default_factory=list)
    expire: int | None = None  # reservation: unix time
    reservation_addrs: list[Multiaddr] = field(default_factory=list)
    limit: Limit | None = None
    status: int | None = None


def _encode_peer(peer: PeerId, addrs: list[Multiaddr]) -> bytes:
    return _proto.encode([(1, peer.multihash), *((2, a.to_bytes()) for a in addrs[:MAX_ADDRS])])


def _decode_addrs(raw: list[bytes]) -> list[Multiaddr]:
    out = []
    for item in raw[:MAX_ADDRS]:
        try:
            out.append(Multiaddr.from_bytes(item))
        except MultiaddrError:
            continue
    return out


def encode(msg: CircuitMessage, hop: bool) -> bytes:
    fields: list[tuple[int, int | bytes | None]] = [(1, msg.type)]
    if msg.peer is not None:
        fields.append((2, _encode_peer(msg.peer, msg.peer_addrs)))
    if hop and msg.expire is not None:
        rsvp: list[tuple[int, int | bytes]] = [(1, msg.expire)]
        rsvp += [(2, a.to_bytes()) for a in msg.reservation_addrs[:MAX_ADDRS]]
        fields.append((3, _proto.encode(rsvp)))
    if msg.limit is not None:
        limit = _proto.encode([(1, msg.limit.duration or None), (2, msg.limit.data or None)])
        fields.append((4 if hop else 3, limit))
    if msg.status is not None:
        fields.append((5 if hop else 4, msg.status))
    return _proto.encode(fields)


def decode(data: bytes, hop: bool) -> CircuitMessage:
    try:
        fields = _proto.decode(data, max_fields=64)
        mtype = _proto.one_int(fields, 1)
        if mtype is None:
            raise ProtocolError("circuit message without a type")
        msg = CircuitMessage(mtype)
        raw_peer = _proto.one_bytes(fields, 2)
        if raw_peer is not None:
            peer_fields = _proto.decode(raw_peer, max_fields=MAX_ADDRS + 8)
            msg.peer = PeerId(_proto.one_bytes(peer_fields, 1, required=True))
            msg.peer_addrs = _decode_addrs(_proto.all_bytes(peer_fields, 2))
        if hop:
            raw_rsvp = _proto.one_bytes(fields, 3)
            if raw_rsvp is not None:
                rsvp = _proto.decode(raw_rsvp, max_fields=MAX_ADDRS + 8)
                msg.expire = _proto.one_int(rsvp, 1, 0)
                msg.reservation_addrs = _decode_addrs(_proto.all_bytes(rsvp, 2))
        raw_limit = _proto.one_bytes(fields, 4 if hop else 3)
        if raw_limit is not None:
            lim = _proto.decode(raw_limit, max_fields=8)
            msg.limit = Limit(_proto.one_int(lim, 1, 0) or 0, _proto.one_int(lim, 2, 0) or 0)
        msg.status = _proto.one_int(fields, 5 if hop else 4)
        return msg
    except (_proto.DecodeError, LatticeError) as exc:
        raise ProtocolError(f"malformed circuit relay message: {exc}") from None


async def write_message(stream: Stream, msg: CircuitMessage, hop: bool) -> None:
    body = encode(msg, hop)
    await stream.write(_proto.delimited(body))


async def read_message(stream: Stream, hop: bool) -> CircuitMessage:
    data = await read_delimited(stream, MAX_MESSAGE)
    if data is None:
        raise ProtocolError("circuit relay stream closed before a message")
    return decode(data, hop)


def status_text(code: int | None) -> str:
    return STATUS_NAMES.get(code or 0, f"status {code}")


class CircuitStream(trio.abc.Stream):
    """A relayed Yamux stream as the byte stream a connection is upgraded over.

    Closing it resets the circuit (a connection that ends is done in both directions), and a reset
    or lost circuit reads as a broken stream, which the secure channel reports as connection lost.
    """

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def carrier(self) -> object:
        """The byte stream of the relay connection this circuit runs on (``tcp_stalled`` reads
        whether that path still acknowledges)."""
        return self.stream.session.carrier()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.stream.write(data)
        except StreamError as exc:
            raise trio.BrokenResourceError(str(exc)) from None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            return await self.stream.read(65536 if max_bytes is None else max_bytes)
        except StreamError as exc:
            raise trio.BrokenResourceError(str(exc)) from None

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()  # flow control waits inside send_all (the stream's window)

    async def aclose(self) -> None:
        await self.stream.reset()


def split_relayed(addr: Multiaddr) -> tuple[Multiaddr, PeerId]:
    """``/ip4/R/tcp/P/p2p/RELAY/p2p-circuit/p2p/TARGET`` -> (the relay's address, TARGET)."""
    names = [n for n, _ in addr.parts]
    if names.count("p2p-circuit") != 1:
        raise DialError(f"cannot dial {addr}: expected exactly one /p2p-circuit")
    at = names.index("p2p-circuit")
    relay = Multiaddr(addr.parts[:at])
    rest = addr.parts[at + 1 :]
    if relay.peer_id is None or not relay.tcp_target():
        raise DialError(f"cannot dial {addr}: the relay part needs /ip4|ip6/.../tcp/PORT/p2p/RELAY")
    if len(rest) != 1 or rest[0][0] != "p2p" or rest[0][1] is None:
        raise DialError(f"cannot dial {addr}: the target part must be /p2p/PEER")
    return relay, PeerId.from_string(rest[0][1])


def install_dialer(host: Host) -> None:
    """Let ``host.connect`` dial ``/p2p-circuit`` addresses (through their relay)."""
    host.set_relayed_dialer(lambda addr, timeout: dial(host, addr, timeout))


async def dial(host: Host, addr: Multiaddr, timeout: float | None = None) -> Connection:
    """Open a connection to the target of a relayed address through its relay."""
    relay_addr, target = split_relayed(addr)
    timeout = timeout or host.config.dial_timeout
    deadline = trio.current_time() + timeout
    if relay_addr.peer_id == host.peer_id:
        raise DialError(f"cannot dial {addr}: we are that relay")
    relay_conn = await host.connect(relay_addr, timeout=timeout)
    try:
        with trio.fail_at(deadline):
            stream = await host.new_stream(relay_conn, [HOP])
    except trio.TooSlowError:
        raise DialError(f"relay {relay_addr.peer_id} did not open a hop stream in time") from None
    except TransportError as exc:
        raise DialError(f"relay {relay_addr.peer_id} does not relay: {exc}") from None
    try:
        with trio.fail_at(deadline):
            await write_message(stream, CircuitMessage(CONNECT, peer=target), hop=True)
            reply = await read_message(stream, hop=True)
    except (trio.TooSlowError, TransportError) as exc:
        await stream.reset()
        why = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
        raise DialError(f"relayed dial of {target} via {relay_addr.peer_id} failed: {why}") from None
    except BaseException:  # cancelled: do not leave a circuit open that the target thinks is live
        await stream.reset()
        raise
    if reply.type != HOP_STATUS or reply.status != OK:
        await stream.reset()
        raise DialError(
            f"relay {relay_addr.peer_id} could not connect us to {target}: {status_text(reply.status)}"
        )
    remote = relay_addr.circuit()
    remaining = max(0.5, deadline - trio.current_time())
    return await host.adopt(CircuitStream(stream), True, remote, expected=target, timeout=remaining)


@dataclass
class Reservation:
    """A slot on a relay: while it lasts, peers can reach us at ``addrs`` (relayed addresses)."""

    relay: PeerId
    expire: float
    addrs: list[Multiaddr]
    limit: Limit | None
    made_at: float = field(default_factory=time.time)


async def reserve(host: Host, conn: Connection, timeout: float = TIMEOUT) -> Reservation:
    """Ask the relay on ``conn`` for a reservation (also used to renew one)."""
    relay = conn.remote_peer
    if conn.relayed:
        raise DialError(f"will not reserve on {relay} over a relayed connection")
    try:
        with trio.fail_after(timeout):
            stream = await host.new_stream(conn, [HOP])
            try:
                await write_message(stream, CircuitMessage(RESERVE), hop=True)
                reply = await read_message(stream, hop=True)
            finally:
                await stream.close()
    except trio.TooSlowError:
        raise DialError(f"reservation on {relay} timed out") from None
    except TransportError as exc:
        raise DialError(f"reservation on {relay} failed: {exc}") from None
    if reply.type != HOP_STATUS or reply.status != OK:
        raise DialError(f"relay {relay} refused a reservation: {status_text(reply.status)}")
    if not reply.expire or reply.expire < time.time():
        raise DialError(f"relay {relay} granted a reservation that is already expired")
    addrs = []
    for addr in reply.reservation_addrs or [conn.remote_addr]:
        if addr.is_relayed or not addr.tcp_target():
            continue
        if addr.is_loopback() and not conn.remote_addr.is_loopback():
            continue  # the relay's 127.0.0.1 leads to the dialer's own machine, never to the relay
        addrs.append(addr.with_peer(relay).circuit())
    return Reservation(relay, float(reply.expire), addrs, reply.limit)


class CircuitListener:
    """Accepts circuits the relays we hold reservations on open to us (the stop protocol). At most
    ``max_pending`` relayed handshakes at a time: a circuit whose dialer never speaks holds one
    until the handshake timeout, and a relay (any stranger can run one) may open many."""

    def __init__(self, host: Host, max_pending: int = 16) -> None:
        self.host = host
        self.relays: set[PeerId] = set()  # relays we accept circuits from (reserved on)
        self.accept_any_relay = False
        self.max_pending = max_pending
        self.pending = 0
        self.stats: dict[str, int] = {"accepted": 0, "refused": 0}

    def install(self) -> None:
        self.host.set_stream_handler(STOP, self._handle_stop)
        install_dialer(self.host)

    async def _handle_stop(self, stream: Stream) -> None:
        relay = stream.remote_peer
        try:
            with trio.fail_after(TIMEOUT):
                msg = await read_message(stream, hop=False)
        except (trio.TooSlowError, TransportError) as exc:
            log.debug("bad stop request from %s: %s", relay, exc)
            await stream.reset()
            return
        refusal = None
        if msg.type != STOP_CONNECT or msg.peer is None:
            refusal = UNEXPECTED_MESSAGE if msg.type != STOP_CONNECT else MALFORMED_MESSAGE
        elif relay not in self.relays and not self.accept_any_relay:
            refusal = PERMISSION_DENIED
        elif self.pending >= self.max_pending:
            refusal = RESOURCE_LIMIT_EXCEEDED
        if refusal is not None:
            self.stats["refused"] += 1
            await write_message(stream, CircuitMessage(STOP_STATUS, status=refusal), hop=False)
            return
        assert msg.peer is not None
        self.pending += 1  # before any wait: concurrent requests must see each other
        try:
            await write_message(stream, CircuitMessage(STOP_STATUS, status=OK), hop=False)
            relay_conn = self.host.connection_to(relay)
            base = relay_conn.remote_addr if relay_conn is not None else Multiaddr.parse("/ip4/0.0.0.0/tcp/0")
            remote = base.with_peer(relay).circuit()
            conn = await self.host.adopt(CircuitStream(stream), False, remote, expected=msg.peer)
        except DialError as exc:
            log.debug("relayed connection from %s via %s failed: %s", msg.peer, relay, exc)
            return
        finally:
            self.pending -= 1
        self.stats["accepted"] += 1
        await conn.wait_closed()  # the stream belongs to the connection until it ends


__all__ = [
    "HOP",
    "STOP",
    "CircuitListener",
    "CircuitMessage",
    "CircuitStream",
    "Limit",
    "Reservation",
    "dial",
    "reserve",
    "split_relayed",
]
