"""Keep relay reservations while we are not reachable, and advertise the relayed addresses.

A private node holds reservations on ``want`` relays (configured ones first, then any connected
peer that speaks the hop protocol, then relays found in the DHT), renews each at half its
lifetime, and when a relay goes away drops it at once and reserves on another: the node stays
reachable through a relay failure. Every change of our relayed addresses calls ``on_change`` (the
node pushes identify to its peers, so the DHT hands out the new addresses).

Relays found in the DHT are claims anyone can make (sybils announcing a third party's address).
Such a candidate is used only once the peer at its address grants a reservation; one address is
tried once whoever claims it (the peer that answers there is the one we reserve on), candidates
of distinct IP prefixes come first, a few are tried at once, and one that fails is left alone for
``bad_for`` seconds, so poisoned records cost one dial per address, not one per sybil.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio

from lattice.errors import LatticeError
from lattice.identity import PeerId
from lattice.multiaddr import Multiaddr
from lattice.nat import circuit
from lattice.nat.circuit import CircuitListener, Reservation
from lattice.transport.host import Connection, Host
from lattice.transport.limits import ip_prefix

log = logging.getLogger(__name__)

MAX_REMEMBERED = 1024  # failed / bad candidates remembered


def spread_by_prefix(addrs: list[Multiaddr]) -> list[Multiaddr]:
    """Round robin over the IP prefixes (/24, /48) of ``addrs``, keeping the order within each:
    many candidates crowding one network come after one of every other network."""
    groups: dict[str, list[Multiaddr]] = {}
    for addr in addrs:
        target = addr.tcp_target()
        groups.setdefault(ip_prefix(target[0]) if target else "", []).append(addr)
    out: list[Multiaddr] = []
    while groups:
        for key in list(groups):
            out.append(groups[key].pop(0))
            if not groups[key]:
                del groups[key]
    return out


def _where(addr: Multiaddr) -> str:
    target = addr.tcp_target()
    return f"{target[0]}:{target[1]}" if target else str(addr)


def _prune(marks: dict, now: float, horizon: float) -> None:
    """Bound a dict of timestamps: drop those older than ``horizon``, then the oldest half."""
    if len(marks) < MAX_REMEMBERED:
        return
    for key in [k for k, t in marks.items() if now - t > horizon]:
        del marks[key]
    if len(marks) >= MAX_REMEMBERED:
        for key in list(marks)[: len(marks) // 2]:
            del marks[key]


class AutoRelay:
    """Reservation manager; ``active`` is driven by reachability (or forced on)."""

    def __init__(
        self,
        host: Host,
        listener: CircuitListener,
        relays: list[Multiaddr] | None = None,
        want: int = 2,
        backoff: float = 30.0,
        bad_for: float = 600.0,
        parallel: int = 4,
        max_discovered: int = 64,
        dial_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self.listener = listener
        self.static = list(relays or [])
        self.want = want
        self.backoff = backoff  # a known relay that failed is retried after this
        self.bad_for = bad_for  # a discovered candidate that failed is left alone this long
        self.parallel = parallel  # candidates tried at once
        self.max_discovered = max_discovered
        self.dial_timeout = dial_timeout
        self.active = False
        self.reservations: dict[PeerId, Reservation] = {}
        self.on_change: list[Callable[[], None]] = []
        self._failed: dict[PeerId, float] = {}
        self._bad: dict[str, float] = {}  # address or claimed peer id -> when it failed
        self.stats = {"verified": 0, "refused_candidates": 0}
        self._wake = trio.Event()
        # Finds more relays when the known ones are not enough (the node plugs in a DHT provider
        # lookup); called at most every ``backoff`` seconds.
        self.discover: Callable[[], Awaitable[list[Multiaddr]]] | None = None
        self.discovered: list[Multiaddr] = []
        self._discovered_at = -1e9
        self._discovering = False

    def addrs(self) -> list[Multiaddr]:
        now = time.time()
        return [a for r in self.reservations.values() if r.expire > now for a in r.addrs]

    def set_active(self, active: bool) -> None:
        if active != self.active:
            self.active = active
            self._wake.set()

    def status(self) -> list[dict]:
        return [
            {
                "relay": str(r.relay),
                "expires_in": round(r.expire - time.time()),
                "addrs": [str(a) for a in r.addrs],
            }
            for r in self.reservations.values()
        ]

    def _changed(self) -> None:
        for callback in self.on_change:
            callback()

    def _on_disconnect(self, conn: Connection) -> None:
        peer = conn.remote_peer
        if peer in self.reservations and self.host.connection_to(peer) is None:
            log.info("relay %s went away; looking for another", peer)
            del self.reservations[peer]
            self.listener.relays.discard(peer)
            self._failed[peer] = time.monotonic()
            self._changed()
            self._wake.set()

    def _on_identify(self, info) -> None:
        if self.active and len(self.reservations) < self.want and circuit.HOP in info.protocols:
            self._wake.set()  # a relay just showed up: reserve now, not at the next tick

    def _backing_off(self, peer: PeerId, now: float) -> bool:
        return now - self._failed.get(peer, -1e9) <= self.backoff

    def _is_bad(self, key: str, now: float) -> bool:
        return now - self._bad.get(key, -1e9) <= self.bad_for

    def _candidates(self) -> list[Multiaddr | PeerId]:
        """Configured relays, then connected peers whose identify lists the hop protocol, then
        discovered ones (not known bad, one per address)."""
        now = time.monotonic()
        out: list[Multiaddr | PeerId] = []
        seen = set(self.reservations)
        for addr in self.static:
            peer = addr.peer_id
            if peer is not None and peer not in seen and not self._backing_off(peer, now):
                out.append(addr)
                seen.add(peer)
        for conn in self.host.connections():
            peer = conn.remote_peer
            info = self.host.peerstore.get(peer)
            if conn.relayed or peer in seen or info is None or circuit.HOP not in info.protocols:
                continue
            if not self._backing_off(peer, now):
                out.append(peer)
                seen.add(peer)
        places: set[str] = set()
        for addr in self.discovered:
            peer, where = addr.peer_id, _where(addr)
            if peer is None or peer in seen or where in places or self._backing_off(peer, now):
                continue
            if self._is_bad(where, now) or self._is_bad(str(peer), now):
                continue
            out.append(addr)
            places.add(where)
        return out

    async def _reserve(self, target: Multiaddr | PeerId) -> None:
        if isinstance(target, Multiaddr) and target not in self.static:
            await self._verify_and_reserve(target)
            return
        peer = target if isinstance(target, PeerId) else target.peer_id
        assert peer is not None
        try:
            if isinstance(target, PeerId):
                conn = await self.host.connect_peer(target, timeout=self.dial_timeout)
            else:
                conn = await self.host.connect(target, timeout=self.dial_timeout)
            rsvp = await circuit.reserve(self.host, conn)
        except (LatticeError, trio.TooSlowError) as exc:
            log.info("no reservation on relay %s: %s", peer, exc)
            self._failed[peer] = time.monotonic()
            _prune(self._failed, time.monotonic(), self.backoff)
            return
        if not rsvp.addrs:
            self._failed[peer] = time.monotonic()
            return
        self._accept(peer, rsvp)

    async def _verify_and_reserve(self, addr: Multiaddr) -> None:
        """A relay found in the DHT: dial its address (whoever answers there, not necessarily the
        peer that claimed it) and ask for a reservation. Anything else marks the address and the
        claiming peer bad for ``bad_for`` seconds; a connection opened only for this is closed."""
        claimed, where = addr.peer_id, _where(addr)
        conn = self.host.connection_to(claimed) if claimed is not None else None
        opened: Connection | None = None
        rsvp = None
        try:
            if conn is None or conn.relayed:
                conn = opened = await self.host.connect(addr.without_peer(), timeout=self.dial_timeout)
            rsvp = await circuit.reserve(self.host, conn, timeout=self.dial_timeout)
        except (LatticeError, trio.TooSlowError) as exc:
            log.info("relay candidate %s (claimed by %s) is no relay: %s", where, claimed, exc)
        finally:  # also when cancelled (enough reservations): a connection opened to verify goes
            if (rsvp is None or not rsvp.addrs) and opened is not None:
                with trio.move_on_after(1.0, shield=True):
                    await opened.close()
        if rsvp is None or not rsvp.addrs:
            self.stats["refused_candidates"] += 1
            now = time.monotonic()
            self._bad[where] = self._bad[str(claimed)] = now
            _prune(self._bad, now, self.bad_for)
            return
        assert conn is not None  # the reservation came over it
        peer = conn.remote_peer
        if peer != claimed:  # a real relay, but the record naming it there was a lie
            log.info("relay candidate %s was announced by %s but is %s", where, claimed, peer)
            self._bad[str(claimed)] = time.monotonic()
        self.stats["verified"] += 1
        self._accept(peer, rsvp)

    def _accept(self, peer: PeerId, rsvp: Reservation) -> None:
        fresh = peer not in self.reservations or self.reservations[peer].addrs != rsvp.addrs
        self.reservations[peer] = rsvp
        self.listener.relays.add(peer)
        log.info(
            "reserved on relay %s until %s", peer, time.strftime("%H:%M:%S", time.localtime(rsvp.expire))
        )
        if fresh:
            self._changed()

    async def _try(self, candidates: list[Multiaddr | PeerId]) -> None:
        """Reserve on ``candidates`` in order, ``parallel`` at a time, until ``want`` are held."""
        slots = trio.Semaphore(max(1, self.parallel))
        async with trio.open_nursery() as nursery:

            async def attempt(target: Multiaddr | PeerId) -> None:
                try:
                    await self._reserve(target)
                finally:
                    slots.release()
                if len(self.reservations) >= self.want:
                    nursery.cancel_scope.cancel()

            for target in candidates:
                await slots.acquire()
                if len(self.reservations) >= self.want:
                    slots.release()
                    break
                nursery.start_soon(attempt, target)

    async def _discover(self) -> None:
        """Look for relays in the DHT (in the background; at most every 5 s while none is found,
        every ``backoff`` seconds after), then wake the reservation loop."""
        try:
            wait = self.backoff if self.discovered else 5.0
            if self.discover is None or time.monotonic() - self._discovered_at < wait:
                return
            self._discovered_at = time.monotonic()
            try:
                with trio.fail_after(10):
                    found = await self.discover()
            except (LatticeError, trio.TooSlowError) as exc:
                log.debug("relay discovery failed: %s", exc)
                return
            mine = self.host.peer_id
            usable = [a for a in found if a.peer_id is not None and a.peer_id != mine and a.tcp_target()]
            self.discovered = spread_by_prefix(usable)[: self.max_discovered]
            if self.discovered:
                log.info("found %d relay(s) through the DHT", len(self.discovered))
                self._wake.set()
        finally:
            self._discovering = False

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        self.host.on_disconnect(self._on_disconnect)
        self.host.on_identify(self._on_identify)
        task_status.started()
        async with trio.open_nursery() as background:  # discovery never delays a reservation
            while True:
                await self._step(background)

    async def _step(self, background: trio.Nursery) -> None:
        if not self.active:
            if self.reservations:  # reachable again: stop advertising relays
                self.reservations.clear()
                self.listener.relays.clear()
                self._changed()
            await self._wake.wait()
            self._wake = trio.Event()
            return
        now = time.time()
        due = [r.relay for r in self.reservations.values() if now > r.made_at + (r.expire - r.made_at) / 2]
        for relay in due:
            await self._reserve(relay)
        if len(self.reservations) < self.want:
            candidates = self._candidates()
            if len(candidates) + len(self.reservations) < self.want and not self._discovering:
                self._discovering = True
                background.start_soon(self._discover)
            await self._try(candidates)
        next_renewal = min(
            (r.made_at + (r.expire - r.made_at) / 2 for r in self.reservations.values()), default=now + 60
        )
        wait = 1.0 if len(self.reservations) < self.want else max(1.0, next_renewal - time.time())
        with trio.move_on_after(wait):
            await self._wake.wait()
        self._wake = trio.Event()


__all__ = ["AutoRelay"]
