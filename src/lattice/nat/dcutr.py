"""DCUtR hole punching (``/libp2p/dcutr``): turn a relayed connection into a direct one.

libp2p's protocol (specs/relay/DCUtR.md). B, the peer that *received* a relayed connection, starts:
it sends CONNECT with its public addresses and times the round trip; A answers CONNECT with its
own; B sends SYNC and waits half a round trip while the SYNC travels; then both dial each other at
once from their listen ports. Two NATs that keep a port mapping for any destination (cone NATs)
each see an outgoing SYN first, so the other's SYN passes: a TCP simultaneous open. Upgrade roles
are fixed by the spec: A is the Noise initiator and Yamux client, B the responder.

Once the direct connection exists the host prefers it for new streams (``Host.connection_to``), and
the relayed one is closed after ``relayed_grace`` seconds (streams already on it may finish).
Behind a symmetric NAT the punch cannot work; after ``attempts`` tries the peers stay relayed and
the outcome is recorded per peer for ``lattice-node status``.

The addresses come from the other peer, so a punch could make us dial anyone (a reflector for
strangers). Hence: punches only over relayed connections (where the protocol belongs), at most
``max_dial_addrs`` unicast addresses dialed per punch, ``per_peer`` punches per peer in
``per_peer_window`` seconds (both roles together: an honest peer needs ``attempts``), and at most
``max_concurrent`` punches at a time.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable

import trio

from lattice import _proto
from lattice.errors import DialError, LatticeError, ProtocolError, TransportError
from lattice.identity import PeerId
from lattice.multiaddr import Multiaddr, MultiaddrError
from lattice.transport.framing import read_delimited
from lattice.transport.host import Connection, Host, open_from_port, sockaddr_to_multiaddr
from lattice.transport.stream import Stream

log = logging.getLogger(__name__)

PROTOCOL_ID = "/libp2p/dcutr"
CONNECT, SYNC = 100, 300
MAX_MESSAGE = 4096
MAX_ADDRS = 8
MAX_RESULTS = 256  # outcomes kept for status (the most recent peers)
TIMEOUT = 10.0


def punch_targets(addrs: list[Multiaddr], limit: int) -> list[Multiaddr]:
    """The first ``limit`` distinct addresses worth a dial: TCP to a unicast IP and a real port (no
    unspecified, multicast, broadcast or reserved address)."""
    out: list[Multiaddr] = []
    for addr in addrs:
        target = addr.tcp_target()
        if target is None or target[1] == 0 or addr in out:
            continue
        try:
            ip = ipaddress.ip_address(target[0])
        except ValueError:
            continue  # a DNS name: not what a punch partner sends
        if ip.is_unspecified or ip.is_multicast or (ip.version == 4 and ip.is_reserved):  # 240/4
            continue
        out.append(addr)
        if len(out) >= limit:
            break
    return out


def punch_failure(addrs: list[Multiaddr], failed: dict[str, str], timeout: float) -> str:
    """Why a punch of ``addrs`` made no connection, each target once: its error, or the timeout
    (what a NAT that drops the SYNs, a symmetric one, gives)."""
    parts = []
    for addr in addrs:
        target = addr.tcp_target()
        if target is not None:
            where = f"{target[0]}:{target[1]}"
            parts.append(f"{where}: {failed.get(where, f'timed out after {timeout:.1f}s')}")
    return "; ".join(parts[:3])


def encode(mtype: int, addrs: list[Multiaddr] = ()) -> bytes:  # type: ignore[assignment]
    body = _proto.encode([(1, mtype), *((2, a.to_bytes()) for a in addrs[:MAX_ADDRS])])
    return _proto.delimited(body)


async def read(stream: Stream, expect: int) -> list[Multiaddr]:
    data = await read_delimited(stream, MAX_MESSAGE)
    if data is None:
        raise ProtocolError("hole punch stream closed early")
    return decode(data, expect)


def decode(data: bytes, expect: int) -> list[Multiaddr]:
    """The direct TCP addresses in a HolePunch message of type ``expect`` (ProtocolError otherwise)."""
    try:
        fields = _proto.decode(data, max_fields=64)
        mtype = _proto.one_int(fields, 1)
        raw = _proto.all_bytes(fields, 2)
    except _proto.DecodeError as exc:
        raise ProtocolError(f"malformed hole punch message: {exc}") from None
    if mtype != expect:
        raise ProtocolError(f"expected hole punch message {expect}, got {mtype}")
    addrs = []
    for item in raw[:MAX_ADDRS]:
        try:
            addr = Multiaddr.from_bytes(item)
        except MultiaddrError:
            continue
        if addr.tcp_target():
            addrs.append(addr.without_peer())
    return addrs


class HolePuncher:
    """Upgrades relayed connections to direct ones; install on every node."""

    def __init__(
        self,
        host: Host,
        public_addrs: Callable[[], list[Multiaddr]],
        attempts: int = 3,
        dial_timeout: float = 3.0,  # a punch lands within the first SYN retransmission (1 s)
        relayed_grace: float = 10.0,
        max_dial_addrs: int = 4,
        per_peer: int = 3,
        per_peer_window: float = 60.0,
        max_concurrent: int = 8,
    ) -> None:
        self.host = host
        self.public_addrs = public_addrs
        self.attempts = attempts
        self.dial_timeout = dial_timeout
        self.relayed_grace = relayed_grace
        self.max_dial_addrs = max_dial_addrs
        self.per_peer = per_peer
        self.per_peer_window = per_peer_window
        self.max_concurrent = max_concurrent
        self.results: dict[PeerId, dict] = {}  # last outcome per peer, for status
        self.refused = 0  # punch requests refused (direct connection, over the rate, too many)
        # one punch per peer at a time, whichever role: two at once dial the same address from the
        # same port, and the second fails ("cannot assign requested address")
        self._punching: dict[PeerId, trio.CancelScope] = {}  # we started it (B's role)
        self._answering: set[PeerId] = set()  # the peer started it (A's role)
        self._recent: dict[PeerId, list[float]] = {}  # start times of a peer's punches, in the window
        self._running = 0

    def _admit(self, peer: PeerId) -> bool:
        """Room for one more punch with ``peer`` (its rate, the node's concurrency)? If so it is
        counted, and the caller calls :meth:`_release` when the punch ends."""
        now = time.monotonic()
        recent = [t for t in self._recent.get(peer, ()) if now - t < self.per_peer_window]
        if len(recent) >= self.per_peer or self._running >= self.max_concurrent:
            self.refused += 1
            return False
        self._recent[peer] = [*recent, now]
        if len(self._recent) > 4 * MAX_RESULTS:
            self._recent = {p: ts for p, ts in self._recent.items() if now - ts[-1] < self.per_peer_window}
        self._running += 1
        return True

    def _release(self) -> None:
        self._running -= 1

    def install(self) -> None:
        self.host.set_stream_handler(PROTOCOL_ID, self._handle)
        self.host.on_connect(self._on_connect)

    def _on_connect(self, conn: Connection) -> None:
        if conn.relayed and conn.direction == "inbound":
            self.host.start_soon(self.punch, conn)
        elif not conn.relayed and any(c.relayed for c in self.host.connections_to(conn.remote_peer)):
            self.host.start_soon(self._retire_relayed, conn.remote_peer)

    def _our_addrs(self) -> list[Multiaddr]:
        return [a for a in self.public_addrs() if a.tcp_target()][:MAX_ADDRS]

    async def punch(self, conn: Connection) -> bool:
        """B's side: coordinate over the relayed ``conn`` and dial; True once direct. When both
        peers dialed each other through relays, both start one: the peer with the lower id keeps
        its punch, the other yields to it (see :meth:`_handle`)."""
        peer = conn.remote_peer
        if peer in self._punching or peer in self._answering:
            return False
        start = time.monotonic()
        error = "no attempt made"
        with trio.CancelScope() as scope:
            self._punching[peer] = scope
            try:
                for attempt in range(1, self.attempts + 1):
                    if self._direct(peer) is not None:
                        return True
                    if conn.closed:
                        error = "relayed connection closed"
                        break
                    try:
                        await self._punch_once(conn)
                        self._record(peer, "direct", start, attempt)
                        return True
                    except (LatticeError, trio.TooSlowError, OSError) as exc:
                        if self._direct(peer) is not None:  # A's SYN reached our listener instead
                            self._record(peer, "direct", start, attempt)
                            return True
                        error = str(exc) or type(exc).__name__
                        log.debug("hole punch %d to %s failed: %s", attempt, peer, error)
                self._record(peer, f"failed: {error}", start, self.attempts)
                return False
            finally:
                if self._punching.get(peer) is scope:
                    del self._punching[peer]
        return self._direct(peer) is not None  # yielded to the peer's punch

    async def _punch_once(self, conn: Connection) -> None:
        peer = conn.remote_peer
        if not self._admit(peer):
            raise DialError("too many hole punches with this peer or at once")
        try:
            await self._coordinate_and_dial(conn)
        finally:
            self._release()

    async def _coordinate_and_dial(self, conn: Connection) -> None:
        peer = conn.remote_peer
        with trio.fail_after(TIMEOUT):
            stream = await self.host.new_stream(conn, [PROTOCOL_ID])
            try:
                sent = trio.current_time()
                await stream.write(encode(CONNECT, self._our_addrs()))
                theirs = await read(stream, CONNECT)
                rtt = trio.current_time() - sent
                await stream.write(encode(SYNC))
            finally:
                await stream.close()
        if not theirs:
            raise DialError("the peer has no public address to punch to")
        await trio.sleep(rtt / 2)
        await self._dial_any(peer, theirs, outbound=False)

    async def _handle(self, stream: Stream) -> None:
        """A's side: answer CONNECT, then dial the moment SYNC arrives (on a relayed connection,
        within the peer's rate)."""
        peer = stream.remote_peer
        conn = self.host.connection_of(stream)
        ours = self._punching.get(peer)
        if ours is not None and self.host.peer_id.multihash < peer.multihash:
            await stream.reset()  # both punching: the lower peer id keeps its own
            return
        if conn is None or not conn.relayed or peer in self._answering or not self._admit(peer):
            if conn is not None and not conn.relayed:
                self.refused += 1
            await stream.reset()
            return
        if ours is not None:
            ours.cancel()  # both punching: we yield to the peer's
        self._answering.add(peer)
        try:
            await self._answer(stream, peer)
        finally:
            self._answering.discard(peer)
            self._release()

    async def _answer(self, stream: Stream, peer: PeerId) -> None:
        start = time.monotonic()
        try:
            with trio.fail_after(TIMEOUT):
                theirs = await read(stream, CONNECT)
                await stream.write(encode(CONNECT, self._our_addrs()))
                await read(stream, SYNC)
        except (trio.TooSlowError, TransportError) as exc:
            log.debug("hole punch coordination with %s failed: %s", peer, exc)
            await stream.reset()
            return
        if not theirs:
            return
        try:
            await self._dial_any(peer, theirs, outbound=True)
            self._record(peer, "direct", start, 1)
        except (LatticeError, trio.TooSlowError, OSError) as exc:
            self._record(peer, f"failed: {exc or type(exc).__name__}", start, 1)

    def _local_port(self, remote: tuple[str, int]) -> tuple[str, int] | None:
        want_v6 = ":" in remote[0]
        for addr in self.host.listen_addrs:
            target = addr.tcp_target()
            if target and (":" in target[0]) == want_v6:
                return target
        return None

    async def _dial_any(self, peer: PeerId, addrs: list[Multiaddr], outbound: bool) -> Connection:
        """Dial the addresses that can reach the peer from here (at most ``max_dial_addrs``, see
        :func:`punch_targets` and ``Host.plausible_addrs``: not its LAN address from another LAN)
        at once from our listen port; the first socket that connects wins."""
        addrs = punch_targets(self.host.plausible_addrs(addrs), self.max_dial_addrs)
        if not addrs:
            raise DialError("the peer named no address reachable from here")
        won: list[trio.SocketStream] = []
        failed: dict[str, str] = {}  # target -> why, for those that failed before the timeout
        with trio.move_on_after(self.dial_timeout):  # bounds every attempt, not just their start
            async with trio.open_nursery() as nursery:

                async def attempt(target: tuple[str, int]) -> None:
                    local = self._local_port(target)
                    try:
                        if local is None:
                            sock = await trio.open_tcp_stream(*target)
                        else:
                            sock = await open_from_port(local, target)
                    except OSError as exc:
                        failed[f"{target[0]}:{target[1]}"] = exc.strerror or str(exc)
                        return
                    if won:
                        await trio.aclose_forcefully(sock)
                        return
                    won.append(sock)
                    nursery.cancel_scope.cancel()

                for addr in addrs:
                    target = addr.tcp_target()
                    if target is not None:
                        nursery.start_soon(attempt, target)
        if not won:
            raise DialError("no punched connection: " + punch_failure(addrs, failed, self.dial_timeout))
        sock = won[0]
        remote = sockaddr_to_multiaddr(sock.socket.getpeername())
        return await self.host.adopt(sock, outbound, remote, expected=peer)

    def _direct(self, peer: PeerId) -> Connection | None:
        conn = self.host.connection_to(peer)
        return conn if conn is not None and not conn.relayed else None

    def _record(self, peer: PeerId, outcome: str, start: float, attempts: int) -> None:
        self.results.pop(peer, None)
        if len(self.results) >= MAX_RESULTS:
            del self.results[next(iter(self.results))]
        self.results[peer] = {
            "outcome": outcome,
            "seconds": round(time.monotonic() - start, 3),
            "attempts": attempts,
            "at": time.time(),
        }
        log.info("hole punch with %s: %s", peer, outcome)

    async def _retire_relayed(self, peer: PeerId) -> None:
        """Close relayed connections to a peer we now reach directly, after a grace period."""
        await trio.sleep(self.relayed_grace)
        if self._direct(peer) is None:
            return
        for conn in self.host.connections_to(peer):
            if conn.relayed and not conn.closed:
                await conn.close()


__all__ = ["PROTOCOL_ID", "HolePuncher"]
