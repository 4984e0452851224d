"""Connection management: stay connected to bootstrap peers, keep connections alive, prune dead ones.

Bootstrap peers are re-dialed with exponential backoff and jitter (1 s doubling to 60 s) whenever the
connection is missing; every connection is pinged at the Yamux level each ``keepalive_interval`` and
closed if the ping fails, so a silently dead peer is noticed and re-dialed.
"""

from __future__ import annotations

import logging
import random

import trio

from lattice.errors import LatticeError
from lattice.identity import PeerId
from lattice.transport.host import Connection, Host
from lattice.transport.multiaddr import Multiaddr

log = logging.getLogger(__name__)

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
        host.on_disconnect(self._on_disconnect)
        host.on_connect(self._on_connect)

    def _on_disconnect(self, conn: Connection) -> None:
        self._changed.set()

    def _on_connect(self, conn: Connection) -> None:
        self.host._nursery.start_soon(self._first_rtt, conn)

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
        async with trio.open_nursery() as nursery:
            for addr in self.bootstrap:
                nursery.start_soon(self._keep_bootstrap, addr)
            nursery.start_soon(self._keepalive)

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
                self.host._nursery.start_soon(self._probe, conn)

    async def _probe(self, conn: Connection) -> None:
        try:
            conn.rtt = await conn.session.ping(timeout=min(10.0, self.keepalive_interval))
        except (LatticeError, trio.TooSlowError):
            log.info("keep-alive to %s failed; closing the connection", conn.remote_peer)
            await conn.close()
