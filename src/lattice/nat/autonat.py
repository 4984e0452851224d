"""Reachability detection: are we reachable from the internet (public), not (private), or unknown?

AutoNAT v2 semantics under our own protocol id (py-libp2p's AutoNAT v1 answers "public" because it
dials back over the connection that already exists, defect 5). A client asks a peer to dial one of
its candidate addresses on a *fresh* TCP connection; the server proves the dial reached us by
sending back a random nonce over that new connection (``/lattice/autonat/dial-back/1.0.0``). A NAT
drops the unsolicited SYN, so a NATed client hears nothing and is private.

Servers only dial addresses whose IP is the one the request came from (no use as a traffic
amplifier), at most ``max_concurrent`` at a time and one request per peer every ``per_peer_interval``.
Candidates are the addresses peers observed for us (identify), each also with our listen port.
A state changes after two agreeing results (one from unknown), and is re-checked every
``interval`` seconds and whenever peers observe us at a new IP.

A server chooses what it reports as dialed, and a peer chooses what it reports as observed, so a
server that dials back genuinely but names a third party's address could make us advertise that
address as ours. A reported address therefore counts only if it is one of the candidates we sent,
and it is advertised (``public_addrs``) only once servers on ``confirmations`` different IP prefixes
(/24, /48) reported it within ``confirm_ttl`` seconds. An honest server dials only the IP it sees us
at, so a forged address never gets its second confirmation.
"""

from __future__ import annotations

import itertools
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Callable

import trio

from lattice import _proto
from lattice.errors import DialError, LatticeError, ProtocolError, TransportError
from lattice.identity import PeerId
from lattice.multiaddr import Multiaddr, MultiaddrError
from lattice.transport.framing import read_delimited
from lattice.transport.host import Connection, Host
from lattice.transport.limits import ip_prefix
from lattice.transport.stream import Stream

log = logging.getLogger(__name__)

PROTOCOL_ID = "/lattice/autonat/1.0.0"
DIAL_BACK_ID = "/lattice/autonat/dial-back/1.0.0"
MAX_MESSAGE = 4096
MAX_ADDRS = 8
MAX_CONFIRMING = 16  # addresses awaiting or holding confirmations
MAX_OBSERVED_IPS = 256
PROBE_GRACE = 10.0  # seconds a server's dial-back may trail our check (its own dial timeouts)

OK, DIAL_ERROR, REFUSED, RATE_LIMITED = 0, 1, 2, 3
PUBLIC, PRIVATE, UNKNOWN = "public", "private", "unknown"


def _frame(fields: list) -> bytes:
    body = _proto.encode(fields)
    return _proto.delimited(body)


async def _read(stream: Stream) -> dict[int, list[int | bytes]]:
    data = await read_delimited(stream, MAX_MESSAGE)
    if data is None:
        raise ProtocolError("autonat stream closed early")
    try:
        return _proto.decode(data, max_fields=32)
    except _proto.DecodeError as exc:
        raise ProtocolError(f"malformed autonat message: {exc}") from None


class AutoNAT:
    """Both roles: answers other peers' dial requests and works out our own reachability."""

    def __init__(
        self,
        host: Host,
        interval: float = 300.0,
        dial_timeout: float = 3.0,
        max_concurrent: int = 4,
        per_peer_interval: float = 5.0,
        serve: bool = True,
        confirmations: int = 2,
        confirm_ttl: float = 3600.0,
    ) -> None:
        self.host = host
        self.interval = interval
        self.dial_timeout = dial_timeout
        self.max_concurrent = max_concurrent
        self.per_peer_interval = per_peer_interval
        self.serve = serve
        self.confirmations = confirmations
        self.confirm_ttl = confirm_ttl
        self.reachability = UNKNOWN
        self.public_addrs: list[Multiaddr] = []  # addresses dial-backs from enough prefixes reached
        self.rejected = 0  # OK answers naming an address we did not ask for (lying servers)
        # address -> {server prefix: when it confirmed}; oldest address first
        self._confirmed: dict[Multiaddr, dict[str, float]] = {}
        # server prefixes asked this round (a round ends after ``interval``): while an address awaits
        # confirmation, each other prefix is asked once per round, not every 2 s
        self._asked: set[str] = set()
        self.results: deque[dict] = deque(maxlen=8)
        self.on_change: list[Callable[[str], None]] = []
        self._pending: dict[int, trio.Event] = {}
        self._served: dict[PeerId, float] = {}
        self._dialing = 0
        self._wake = trio.Event()
        self._observed_seen = 0
        self._observed_ips: set[tuple[str, str | None]] = set()
        self.checks = 0  # checks started (each one costs a server a fresh connection)

    def install(self) -> None:
        if self.serve:
            self.host.set_stream_handler(PROTOCOL_ID, self._handle_request)
        self.host.set_stream_handler(DIAL_BACK_ID, self._handle_dial_back)
        self.host.on_identify(lambda info: self._maybe_wake())

    def status(self) -> dict:
        return {
            "reachability": self.reachability,
            "public_addrs": [str(a) for a in self.public_addrs],
            "confirming": {str(a): len(p) for a, p in self._confirmed.items() if a not in self.public_addrs},
            "rejected_answers": self.rejected,
            "last_checks": list(self.results)[-3:],
        }

    def _maybe_wake(self) -> None:
        """Re-check when peers observe us at a new IP. Not on every observation: each connection
        reports another port of the same IP, and the dial-back of a check reports one more, so a
        wake per observation kept every node of a swarm checking (a new connection) forever."""
        observed = self.host.observed_addrs
        if len(observed) == self._observed_seen:  # only counts went up: nothing new
            return
        # new addresses are appended (a Counter keeps insertion order): look at those only
        start = self._observed_seen if len(observed) > self._observed_seen else 0
        self._observed_seen = len(observed)
        fresh = {addr.parts[0] for addr in itertools.islice(observed, start, None)} - self._observed_ips
        if fresh:
            if len(self._observed_ips) + len(fresh) > MAX_OBSERVED_IPS:  # peers choose them: bounded
                self._observed_ips = set()
            self._observed_ips |= fresh
            self._wake.set()
        elif self._wants_confirmation():  # a server on a prefix we have not asked yet showed up
            self._wake.set()

    # -- client
    def candidates(self) -> list[Multiaddr]:
        """Addresses to test: observed ones with our listen port first (a port-preserving NAT maps
        the listen port to itself), then as observed."""
        ports = {a.parts[0][0]: a.parts[1][1] for a in self.host.listen_addrs if a.tcp_target()}
        out: list[Multiaddr] = []
        for addr, _ in self.host.observed_addrs.most_common(MAX_ADDRS):
            if addr.is_relayed or not addr.tcp_target():
                continue
            net = addr.parts[0][0]
            if net in ports:
                out.append(Multiaddr((addr.parts[0], ("tcp", ports[net]))))
            out.append(addr.without_peer())
        return list(dict.fromkeys(out))[:MAX_ADDRS]

    def _servers(self) -> list[Connection]:
        out = []
        for conn in self.host.connections():
            info = self.host.peerstore.get(conn.remote_peer)
            if not conn.relayed and not conn.probe and info is not None and PROTOCOL_ID in info.protocols:
                out.append(conn)
        return out

    def _unasked_servers(self) -> list[Connection]:
        """Servers on prefixes not asked this round (none if no address awaits confirmation)."""
        if not self._pending_addrs():
            return []
        return [c for c in self._servers() if server_prefix(c) not in self._asked]

    def _pending_addrs(self) -> list[Multiaddr]:
        return [a for a in self._confirmed if a not in self.public_addrs]

    def _wants_confirmation(self) -> bool:
        return self.reachability == PUBLIC and bool(self._unasked_servers())

    async def check(self, conn: Connection | None = None) -> str | None:
        """One check with one server; returns public/private, or None if it told us nothing. While
        an address awaits confirmation, a server of a prefix not asked yet is preferred."""
        if conn is None:
            servers = self._unasked_servers() or self._servers()
            if not servers:
                return None
            conn = random.choice(servers)
        prefix = server_prefix(conn)
        self._asked.add(prefix)
        addrs = self.candidates()
        if not addrs:
            return None
        self.checks += 1
        nonce = secrets.randbits(63)
        event = self._pending[nonce] = trio.Event()
        result: str | None = None
        status = None
        dialed = None
        # its dial-back is no connection for us, even if it comes after we stopped waiting
        self.host.expect_probe(conn.remote_peer, self.dial_timeout + 5.0 + PROBE_GRACE)
        try:
            with trio.fail_after(self.dial_timeout + 5.0):
                stream = await self.host.new_stream(conn, [PROTOCOL_ID])
                try:
                    await stream.write(_frame([(1, nonce), *((2, a.to_bytes()) for a in addrs)]))
                    reply = await _read(stream)
                finally:
                    await stream.close()
            status = _proto.one_int(reply, 1)
            raw = _proto.one_bytes(reply, 2)
            dialed = Multiaddr.from_bytes(raw).without_peer() if raw else None
            if status == OK and dialed not in addrs:  # a server naming an address we never sent
                self.rejected += 1
                log.info("AutoNAT server %s reported an address we never sent: %s", conn.remote_peer, dialed)
                status = None
            if status == OK:
                with trio.move_on_after(1.0):
                    await event.wait()  # the nonce may trail the answer by a moment
                result = PUBLIC if event.is_set() else None  # OK without our nonce proves nothing
            elif status == DIAL_ERROR:
                result = PRIVATE
        except (trio.TooSlowError, TransportError, MultiaddrError, _proto.DecodeError) as exc:
            log.debug("reachability check with %s failed: %s", conn.remote_peer, exc)
        finally:
            self._pending.pop(nonce, None)
        self.results.append(
            {"server": str(conn.remote_peer), "status": status, "result": result, "at": round(time.time(), 1)}
        )
        if result is not None:
            self._update(result, dialed if result == PUBLIC else None, prefix)
        return result

    def _confirm(self, addr: Multiaddr, prefix: str) -> None:
        """Count a server of ``prefix`` reaching us at ``addr``; advertise the address once servers
        of ``confirmations`` prefixes did within ``confirm_ttl``."""
        now = time.monotonic()
        if addr not in self._confirmed and len(self._confirmed) >= MAX_CONFIRMING:
            del self._confirmed[next(iter(self._confirmed))]
        by = self._confirmed.pop(addr, {})
        by[prefix] = now
        self._confirmed[addr] = {p: t for p, t in by.items() if now - t < self.confirm_ttl}
        self.public_addrs = confirmed_addrs(self._confirmed, now, self.confirm_ttl, self.confirmations)

    def _update(self, result: str, dialed: Multiaddr | None, prefix: str = "") -> None:
        if result == PUBLIC and dialed is not None:
            self._confirm(dialed, prefix)
        if result == self.reachability:
            return
        conclusive = [r["result"] for r in self.results if r["result"] is not None]
        if self.reachability != UNKNOWN and conclusive[-2:] != [result, result]:
            return  # leaving a known state takes two agreeing results
        self.reachability = result
        if result == PRIVATE:
            self.public_addrs = []
            self._confirmed.clear()
        log.info("reachability: %s", result)
        for callback in self.on_change:
            callback(result)

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Check as soon as a server and a candidate exist, then every ``interval`` or on change."""
        task_status.started()
        while True:
            settled = self.reachability != UNKNOWN and not self._wants_confirmation()
            with trio.move_on_after(self.interval if settled else 2.0) as waited:
                await self._wake.wait()
            if settled and waited.cancelled_caught:
                self._asked.clear()  # a new round
            self._wake = trio.Event()
            result = await self.check()
            if result is not None and self.reachability != result:
                await trio.sleep(0.5)  # confirm a change at once, with another server if we can
                await self.check()

    async def _handle_dial_back(self, stream: Stream) -> None:
        conn = self.host.connection_of(stream)
        if conn is not None:  # a dial-back arriving after check() stopped expecting it
            conn.probe = True
        try:
            with trio.fail_after(5.0):
                msg = await _read(stream)
        except (trio.TooSlowError, TransportError):
            await stream.reset()
            return
        nonce = _proto.one_int(msg, 1)
        event = self._pending.get(nonce) if nonce is not None else None
        if event is not None:
            event.set()

    # -- server
    async def _handle_request(self, stream: Stream) -> None:
        peer = stream.remote_peer
        conn = self.host.connection_of(stream)
        try:
            with trio.fail_after(5.0):
                req = await _read(stream)
            nonce = _proto.one_int(req, 1)
            raw_addrs = _proto.all_bytes(req, 2)
        except (trio.TooSlowError, TransportError, _proto.DecodeError):
            await stream.reset()
            return
        now = time.monotonic()
        if conn is None or conn.relayed or nonce is None:
            await stream.write(_frame([(1, REFUSED)]))
            return
        recent = now - self._served.get(peer, -1e9) < self.per_peer_interval
        if recent or self._dialing >= self.max_concurrent:
            await stream.write(_frame([(1, RATE_LIMITED)]))
            return
        self._served[peer] = now
        if len(self._served) > 4096:
            self._served = {p: t for p, t in self._served.items() if now - t < self.per_peer_interval}
        their_ip = conn.remote_addr.ip
        targets = []
        for raw in raw_addrs[:MAX_ADDRS]:
            try:
                addr = Multiaddr.from_bytes(raw)
            except MultiaddrError:
                continue
            if addr.tcp_target() and addr.ip == their_ip:  # never dial a third party
                targets.append(addr.without_peer())
        if not targets:
            await stream.write(_frame([(1, REFUSED)]))
            return
        self._dialing += 1
        reached: list[Multiaddr] = []
        try:
            async with trio.open_nursery() as nursery:  # at once: a dropped SYN costs the timeout

                async def try_one(addr: Multiaddr) -> None:
                    if await self._dial_back(addr, peer, nonce):
                        reached.append(addr)
                        nursery.cancel_scope.cancel()

                for addr in targets[:2]:
                    nursery.start_soon(try_one, addr)
        finally:
            self._dialing -= 1
        if reached:
            await stream.write(_frame([(1, OK), (2, reached[0].to_bytes())]))
        else:
            await stream.write(_frame([(1, DIAL_ERROR), (2, targets[0].to_bytes())]))

    async def _dial_back(self, addr: Multiaddr, peer: PeerId, nonce: int) -> bool:
        """A new connection (never the existing one) to ``addr``; deliver the nonce over it."""
        target = addr.tcp_target()
        assert target is not None
        try:
            with trio.fail_after(self.dial_timeout):
                sock = await trio.open_tcp_stream(*target)
        except (OSError, trio.TooSlowError):
            return False
        try:
            conn = await self.host.adopt(
                sock, True, addr, expected=peer, timeout=self.dial_timeout, probe=True
            )
        except DialError:
            return False
        try:
            with trio.fail_after(self.dial_timeout):
                stream = await self.host.new_stream(conn, [DIAL_BACK_ID])
                await stream.write(_frame([(1, nonce)]))
                await stream.close()
                await stream.read(1)  # wait for the client to take it (its close)
            return True
        except (trio.TooSlowError, LatticeError):
            return False
        finally:
            await conn.close()


def server_prefix(conn: Connection) -> str:
    """The IP prefix (/24, /48) a server's confirmations count for."""
    return ip_prefix(conn.remote_addr.ip or "")


def confirmed_addrs(
    confirmed: dict[Multiaddr, dict[str, float]], now: float, ttl: float, needed: int
) -> list[Multiaddr]:
    """Addresses reached by servers of at least ``needed`` prefixes within ``ttl``, newest first, at
    most 4."""
    fresh = [a for a, by in confirmed.items() if sum(1 for t in by.values() if now - t < ttl) >= needed]
    return fresh[::-1][:4]


__all__ = ["PRIVATE", "PROTOCOL_ID", "PUBLIC", "UNKNOWN", "AutoNAT"]
