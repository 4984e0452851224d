"""Keep relay reservations while we are not reachable, and advertise the relayed addresses.

A private node holds reservations on ``want`` relays (configured ones first, then any connected
peer that speaks the hop protocol), renews each at half its lifetime, and when a relay goes away
drops it at once and reserves on another: the node stays reachable through a relay failure.
Every change of our relayed addresses calls ``on_change`` (the node pushes identify to its peers,
so the DHT hands out the new addresses).
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

log = logging.getLogger(__name__)


class AutoRelay:
    """Reservation manager; ``active`` is driven by reachability (or forced on)."""

    def __init__(
        self,
        host: Host,
        listener: CircuitListener,
        relays: list[Multiaddr] | None = None,
        want: int = 2,
        backoff: float = 30.0,
    ) -> None:
        self.host = host
        self.listener = listener
        self.static = list(relays or [])
        self.want = want
        self.backoff = backoff
        self.active = False
        self.reservations: dict[PeerId, Reservation] = {}
        self.on_change: list[Callable[[], None]] = []
        self._failed: dict[PeerId, float] = {}
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

    def _candidates(self) -> list[Multiaddr | PeerId]:
        now = time.monotonic()
        out: list[Multiaddr | PeerId] = []
        seen = set(self.reservations)
        for addr in [*self.static, *self.discovered]:
            peer = addr.peer_id
            if peer is not None and peer not in seen and now - self._failed.get(peer, -1e9) > self.backoff:
                out.append(addr)
                seen.add(peer)
        for conn in self.host.connections():
            peer = conn.remote_peer
            info = self.host.peerstore.get(peer)
            if conn.relayed or peer in seen or info is None or circuit.HOP not in info.protocols:
                continue
            if now - self._failed.get(peer, -1e9) > self.backoff:
                out.append(peer)
                seen.add(peer)
        return out

    async def _reserve(self, target: Multiaddr | PeerId) -> None:
        peer = target if isinstance(target, PeerId) else target.peer_id
        assert peer is not None
        try:
            if isinstance(target, PeerId):
                conn = await self.host.connect_peer(target, timeout=5.0)
            else:
                conn = await self.host.connect(target, timeout=5.0)
            rsvp = await circuit.reserve(self.host, conn)
        except (LatticeError, trio.TooSlowError) as exc:
            log.info("no reservation on relay %s: %s", peer, exc)
            self._failed[peer] = time.monotonic()
            return
        if not rsvp.addrs:
            self._failed[peer] = time.monotonic()
            return
        fresh = peer not in self.reservations or self.reservations[peer].addrs != rsvp.addrs
        self.reservations[peer] = rsvp
        self.listener.relays.add(peer)
        log.info(
            "reserved on relay %s until %s", peer, time.strftime("%H:%M:%S", time.localtime(rsvp.expire))
        )
        if fresh:
            self._changed()

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
            self.discovered = [a for a in found if a.peer_id is not None and a.peer_id != mine][:16]
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
            candidates = self._candidates()[: self.want - len(self.reservations)]
            if len(candidates) + len(self.reservations) < self.want and not self._discovering:
                self._discovering = True
                background.start_soon(self._discover)
            async with trio.open_nursery() as nursery:
                for target in candidates:
                    nursery.start_soon(self._reserve, target)
        next_renewal = min(
            (r.made_at + (r.expire - r.made_at) / 2 for r in self.reservations.values()), default=now + 60
        )
        wait = 1.0 if len(self.reservations) < self.want else max(1.0, next_renewal - time.time())
        with trio.move_on_after(wait):
            await self._wake.wait()
        self._wake = trio.Event()


__all__ = ["AutoRelay"]
