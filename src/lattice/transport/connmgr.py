"""Connection management: stay connected to bootstrap peers, keep connections alive, prune dead ones.

Bootstrap peers are re-dialed with exponential backoff and jitter (1 s doubling to 60 s) whenever the
connection is missing; every connection is pinged at the Yamux level each ``keepalive_interval`` and
closed if the ping fails, so a silently dead peer is noticed and re-dialed.

Services may also ask to stay connected to a peer they work with (:meth:`ConnectionManager.keep`,
e.g. the CRDT service for its replicas). Its connections are pinged every ``KEPT_PROBE_INTERVAL`` s
(closed after ``KEPT_PROBE_TIMEOUT`` s without an answer), so a cut path is noticed within seconds,
not after TCP's retransmission backoff; once lost, the peer is re-dialed quickly: attempts of
at most ``KEPT_ATTEMPT`` s every ``KEPT_INTERVAL`` s for ``KEPT_FAST_WINDOW`` s (a healed partition
or a restarted peer is back within about a second), then with the usual backoff up to
``max_backoff``; it is forgotten after ``KEPT_GIVE_UP`` s without success.
"""

from __future__ import annotations

import logging
import random

import trio

from lattice.errors import LatticeError
from lattice.identity import PeerId
from lattice.multiaddr import Multiaddr
from lattice.transport.host import Connection, Host

log = logging.getLogger(__name__)

KEPT_ATTEMPT = 1.0
KEPT_INTERVAL = 0.25
KEPT_FAST_WINDOW = 300.0
KEPT_GIVE_UP = 3600.0
MAX_KEPT = 64
KEPT_PROBE_INTERVAL = 5.0
KEPT_PROBE_TIMEOUT = 3.0
FIRST_RTT_DELAY = 1.0  # seconds after a connection opens until its RTT is first measured


class ConnectionManager:
    def __init__(
        self,
        host: Host,
        bootstrap: list[Multiaddr],
        keepalive_interval: float = 30.0,
        min_backoff: float = 1.0,
        max_backoff: float = 60.0,
    ) -> None:
        self.host = host
        self.bootstrap = bootstrap
        self.keepalive_interval = keepalive_interval
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.bootstrap_peers: dict[Multiaddr, PeerId | None] = {a: a.peer_id for a in bootstrap}
        self._changed = trio.Event()
        self.kept: set[PeerId] = set()
        self._redialing: set[PeerId] = set()
        self._nursery: trio.Nursery | None = None
        host.on_disconnect(self._on_disconnect)
        host.on_connect(self._on_connect)

    def _on_disconnect(self, conn: Connection) -> None:
        self._changed.set()
        peer = conn.remote_peer
        if peer in self.kept and peer not in self._redialing and self._nursery is not None:
            try:
                self._nursery.start_soon(self._redial, peer)
            except RuntimeError:  # shutting down: the nursery no longer takes tasks
                return
            self._redialing.add(peer)

    def keep(self, peer: PeerId) -> bool:
        """Stay connected to ``peer``: re-dial it quickly whenever its connection drops (at most
        ``MAX_KEPT`` peers; returns whether it is kept)."""
        if peer in self.kept:
            return True
        if len(self.kept) >= MAX_KEPT or peer == self.host.peer_id:
            return False
        self.kept.add(peer)
        return True

    def forget(self, peer: PeerId) -> None:
        self.kept.discard(peer)

    async def _redial(self, peer: PeerId) -> None:
        lost = trio.current_time()
        backoff = self.min_backoff
        try:
            while peer in self.kept and self.host.connection_to(peer) is None:
                elapsed = trio.current_time() - lost
                if elapsed > KEPT_GIVE_UP:
                    log.info("giving up on %s after %.0f s", peer, elapsed)
                    self.kept.discard(peer)
                    return
                if await self._dial_known(peer):
                    log.info("reconnected to %s after %.1f s", peer, trio.current_time() - lost)
                    return
                if elapsed < KEPT_FAST_WINDOW:
                    await trio.sleep(KEPT_INTERVAL)
                else:
                    await trio.sleep(backoff * random.uniform(0.8, 1.2))
                    backoff = min(backoff * 2, self.max_backoff)
        finally:
            self._redialing.discard(peer)

    async def _dial_known(self, peer: PeerId) -> bool:
        """Dial the peer's known direct addresses at once (no peer-router lookup: this runs every
        second or so); True once one connected."""
        info = self.host.peerstore.get(peer)
        direct = [a for a in (info.addrs if info else []) if a.tcp_target() and not a.is_relayed]
        addrs = self.host.plausible_addrs(direct)[:4]
        won: list[Connection] = []
        with trio.move_on_after(2 * KEPT_ATTEMPT):
            async with trio.open_nursery() as nursery:

                async def attempt(addr: Multiaddr) -> None:
                    try:
                        won.append(await self.host.connect(addr.with_peer(peer), timeout=KEPT_ATTEMPT))
                    except (LatticeError, trio.TooSlowError, OSError) as exc:
                        log.debug("re-dial of %s at %s failed: %s", peer, addr, exc)
                        return
                    nursery.cancel_scope.cancel()

                for addr in addrs:
                    nursery.start_soon(attempt, addr)
        return bool(won) or self.host.connection_to(peer) is not None

    def _on_connect(self, conn: Connection) -> None:
        self.host.start_soon(self._first_rtt, conn)

    async def _first_rtt(self, conn: Connection) -> None:
        """Measure a new connection's RTT once soon after it opens (status, top and the web page
        show it at once rather than after the first keep-alive); a failure here closes nothing."""
        await trio.sleep(FIRST_RTT_DELAY)
        if conn.closed or conn.rtt is not None:
            return
        try:
            conn.rtt = await conn.session.ping(timeout=5.0)
        except (LatticeError, trio.TooSlowError):
            pass

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for addr in self.bootstrap:
                    nursery.start_soon(self._keep_bootstrap, addr)
                nursery.start_soon(self._keepalive)
                nursery.start_soon(self._probe_kept)
        finally:
            self._nursery = None

    async def _keep_bootstrap(self, addr: Multiaddr) -> None:
        backoff = self.min_backoff
        while True:  # lives as long as the node; each pass waits for a change or a backoff
            peer = self.bootstrap_peers.get(addr)
            if peer is not None and self.host.connection_to(peer) is not None:
                backoff = self.min_backoff
                if self._changed.is_set():  # consumed: wait for the next disconnect
                    self._changed = trio.Event()
                await self._changed.wait()
                continue
            try:
                conn = await self.host.connect(addr)
            except LatticeError as exc:
                delay = backoff * random.uniform(0.8, 1.2)
                log.info("bootstrap %s unreachable (%s); retrying in %.1fs", addr, exc, delay)
                await trio.sleep(delay)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            self.bootstrap_peers[addr] = conn.remote_peer
            log.info("connected to bootstrap peer %s", conn.remote_peer)

    async def _keepalive(self) -> None:
        while True:
            await trio.sleep(self.keepalive_interval)
            for conn in self.host.connections():
                self.host.start_soon(self._probe, conn)

    async def _probe_kept(self) -> None:
        while True:
            await trio.sleep(KEPT_PROBE_INTERVAL * random.uniform(0.9, 1.1))
            for conn in self.host.connections():
                if conn.remote_peer in self.kept:
                    self.host.start_soon(self._probe, conn, KEPT_PROBE_TIMEOUT)

    async def _probe(self, conn: Connection, timeout: float | None = None) -> None:
        timeout = timeout or min(10.0, self.keepalive_interval)
        try:  # the outer bound also covers a ping frame stuck behind a full send buffer
            with trio.fail_after(timeout + 1.0):
                conn.rtt = await conn.session.ping(timeout=timeout)
        except (LatticeError, trio.TooSlowError):
            log.info("keep-alive to %s failed; closing the connection", conn.remote_peer)
            await conn.close()
