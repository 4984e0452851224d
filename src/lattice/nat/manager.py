"""NAT traversal for a node: reachability, relay reservations, hole punching, serving as a relay.

The pieces (autonat, autorelay, circuit, dcutr, relay) compose here:
- reachability is checked by dial-back (AutoNAT); until it is known to be public, the node keeps
  reservations on relays (bootstrap peers that relay count) and advertises the relayed addresses,
  so a NATed node is reachable a moment after start, not after a check's timeout;
- a relayed connection is upgraded to a direct one by DCUtR when both NATs allow it;
- ``relay_service=True`` (``lattice-node run --relay``) serves circuits for others, within limits,
  unless reachability detection finds the node private (a relay behind a NAT helps nobody: it stops
  serving, and the node does not announce it, until it is reachable again);
- relay paths (connections to the relays we hold reservations on, circuits through relays) are
  pinged every ``relay_probe_interval``: a relay host that vanishes without a FIN or RST is noticed
  within seconds, and its reservation and circuits move to another relay;
- our advertised addresses gain confirmed public ones and relayed ones, and every change is
  pushed to connected peers (identify push), so the DHT hands out current addresses.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from lattice.errors import LatticeError
from lattice.multiaddr import Multiaddr, dialable
from lattice.nat.autonat import PRIVATE, PUBLIC, AutoNAT
from lattice.nat.autorelay import AutoRelay
from lattice.nat.circuit import CircuitListener
from lattice.nat.dcutr import HolePuncher
from lattice.nat.relay import RelayLimits, RelayServer
from lattice.transport import identify
from lattice.transport.host import Connection, Host, tcp_stalled
from lattice.transport.limits import TokenBucket

if TYPE_CHECKING:  # imported when port mapping starts (most nodes never map a port)
    from lattice.nat.portmap import Mapping, PortMapper

log = logging.getLogger(__name__)

REACHABILITY_MODES = ("auto", "public", "private")


@dataclass
class NATConfig:
    reachability: str = "auto"  # "public"/"private" skip detection (operators who know)
    relay_service: bool = False
    relay_limits: RelayLimits = field(default_factory=RelayLimits)
    relays: list[Multiaddr] = field(default_factory=list)  # preferred relays (else bootstrap peers)
    want_relays: int = 2
    hole_punching: bool = True
    autonat_interval: float = 300.0
    autonat_dial_timeout: float = 3.0
    autonat_confirmations: int = 2  # servers on distinct /24 (/48) before a public address is advertised
    upnp: bool = False  # map the listen port on the gateway (UPnP IGD / NAT-PMP) and announce it
    mdns: bool = False  # find and connect to peers on the LAN
    mdns_max_dials: int = 16  # LAN peers dialed at once (anyone on the LAN can announce) ...
    mdns_dials_per_minute: float = 12.0  # ... and per minute; a peer whose dial failed waits 10 min
    mdns_max_peers: int = 256  # LAN peers remembered (the most recently announced)
    # relay paths quiet for this long are pinged; one that does not answer within the timeout is
    # closed (a relay that vanished silently is otherwise noticed by the 30 s keep-alive, or TCP)
    relay_probe_interval: float = 2.0
    relay_probe_timeout: float = 3.0


class NATManager:
    def __init__(self, host: Host, config: NATConfig | None = None) -> None:
        self.host = host
        self.config = cfg = config or NATConfig()
        self.autonat = AutoNAT(
            host,
            interval=cfg.autonat_interval,
            dial_timeout=cfg.autonat_dial_timeout,
            confirmations=cfg.autonat_confirmations,
        )
        self.listener = CircuitListener(host)
        self.autorelay = AutoRelay(host, self.listener, cfg.relays, want=cfg.want_relays)
        self.puncher = HolePuncher(host, self.punch_addrs) if cfg.hole_punching else None
        self.relay_server = RelayServer(host, cfg.relay_limits) if cfg.relay_service else None
        self._push = trio.Event()
        self.mapping: Mapping | None = None  # once the gateway mapped our port
        self.mapper: PortMapper | None = None
        self.mdns_found: OrderedDict[str, list[Multiaddr]] = OrderedDict()
        self._mdns_dialing = 0
        self._mdns_failed: OrderedDict[str, float] = OrderedDict()  # peer -> until when not dialed
        self._mdns_bucket = TokenBucket(
            self.config.mdns_dials_per_minute / 60.0, float(self.config.mdns_max_dials), time.monotonic()
        )

    @property
    def reachability(self) -> str:
        if self.config.reachability != "auto":
            return self.config.reachability
        return self.autonat.reachability

    def use_relay_discovery(self, discover: Callable[[], Awaitable[list[Multiaddr]]]) -> None:
        """Where to look for relays beyond the configured and connected ones (the node gives a DHT
        provider lookup): each address found is only a candidate until it grants a reservation."""
        self.autorelay.discover = discover

    def install(self) -> None:
        """Register protocol handlers (before the host accepts connections)."""
        self.listener.install()
        self.autonat.install()
        if self.puncher is not None:
            self.puncher.install()
        if self.relay_server is not None:
            self.relay_server.install()
        self.host.add_address_source(self.extra_addrs)
        self.autonat.on_change.append(lambda _: self._reachability_changed())
        self.autorelay.on_change.append(self.request_push)
        self._reachability_changed()

    def _reachability_changed(self) -> None:
        reach = self.reachability
        # a relay assumes it is reachable until detection says otherwise (operators run relays on
        # public hosts, and peers reserve on them at once); other nodes reserve until it is known
        self.autorelay.set_active(reach == PRIVATE if self.relay_server is not None else reach != PUBLIC)
        if self.relay_server is not None:
            self.relay_server.set_serving(reach != PRIVATE)  # the push tells peers our protocols
        self.request_push()

    @property
    def relay_announceable(self) -> bool:
        """Serving as a relay and known to be reachable: the node may announce itself as a relay."""
        return self.relay_server is not None and self.reachability == PUBLIC

    def request_push(self) -> None:
        """Our addresses changed: tell connected peers (soon, once for a burst of changes)."""
        self._push.set()

    def extra_addrs(self) -> list[Multiaddr]:
        """Addresses beyond our listen addresses: mapped and confirmed public ones, relayed ones."""
        mapped: list[Multiaddr] = []
        if self.mapping is not None and self.mapping.is_public:
            from lattice.nat.portmap import external_multiaddr

            mapped.append(external_multiaddr(self.mapping))
        return [*mapped, *self.autonat.public_addrs, *self.autorelay.addrs()]

    def punch_addrs(self) -> list[Multiaddr]:
        """What we tell a hole-punch partner to dial: public candidates, then the rest."""
        direct = [a for a in self.host.advertised_addrs() if a.tcp_target() and not a.is_loopback()]
        return dialable([*self.autonat.public_addrs, *self.autonat.candidates(), *direct])

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self.config.reachability == "auto":
                nursery.start_soon(self.autonat.run)
            nursery.start_soon(self.autorelay.run)
            nursery.start_soon(self._watch_relay_paths)
            if self.config.upnp:
                nursery.start_soon(self._port_mapping)
            if self.config.mdns:
                nursery.start_soon(self._lan_discovery)
            task_status.started()
            while True:
                await self._push.wait()
                await trio.sleep(0.05)  # coalesce bursts of changes into one push
                self._push = trio.Event()
                await identify.push(self.host)

    def _relay_paths(self) -> list[Connection]:
        """Connections that die silently with a relay: circuits, and direct connections to the
        relays we hold reservations on."""
        held = self.autorelay.reservations
        return [c for c in self.host.connections() if c.relayed or c.remote_peer in held]

    async def _watch_relay_paths(self) -> None:
        """Ping relay paths that were quiet since the last round; close those that do not answer
        (autorelay then reserves elsewhere, and the next dial of a peer takes another circuit)."""
        heard: dict[int, int] = {}  # id(session) -> bytes received when last looked at
        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(self.config.relay_probe_interval)
                paths = self._relay_paths()
                for conn in paths:
                    key, received = id(conn.session), conn.session.bytes_received
                    if heard.get(key) != received:  # traffic arrived since the last round: alive
                        heard[key] = received
                        continue
                    nursery.start_soon(self._probe_path, conn)
                live = {id(c.session) for c in paths}
                heard = {k: n for k, n in heard.items() if k in live}

    async def _probe_path(self, conn: Connection) -> None:
        """Close ``conn`` if a ping goes unanswered and the TCP connection under it (for a circuit:
        the one to its relay) has the ping unacknowledged: the path is dead, not the peer slow."""
        before = conn.session.bytes_received
        timeout = self.config.relay_probe_timeout
        try:
            await conn.session.ping(timeout=timeout)
            return
        except (LatticeError, trio.TooSlowError):
            if conn.closed or conn.session.bytes_received != before:
                return
            if tcp_stalled(conn.session.carrier(), timeout / 2) is False:
                return
        log.info("relay path %s to %s is silent: closing it", conn.remote_addr, conn.remote_peer)
        await conn.close()

    async def _port_mapping(self) -> None:
        """Map our TCP listen port on the gateway, keep it renewed, announce the external address."""
        from lattice.nat.portmap import PortMapper

        targets = [a.tcp_target() for a in self.host.listen_addrs if a.parts[0][0] == "ip4"]
        port = next((t[1] for t in targets if t is not None), None)
        if port is None:
            return
        self.mapper = mapper = PortMapper()
        try:
            self.mapping = await mapper.map(port)
            if self.mapping is None:
                log.info("no port mapping: %s", mapper.last_error)
            elif not self.mapping.is_public:
                log.info("gateway mapped port %d to a private address (double NAT): not announced", port)
            self.request_push()

            def on_change(_port: int, mapping) -> None:
                self.mapping = mapping
                self.request_push()

            await mapper.run_renewals(on_change)
        finally:
            with trio.CancelScope(shield=True):
                await mapper.aclose()

    async def _lan_discovery(self) -> None:
        """mDNS: announce our LAN addresses, dial peers that announce theirs (bounded)."""
        from lattice.errors import LatticeError
        from lattice.identity import PeerId
        from lattice.nat.mdns import MDNS, MDNSError

        send, receive = trio.open_memory_channel[tuple[str, list[Multiaddr]]](64)

        def announced() -> list[Multiaddr]:
            lan = [a for a in self.host.advertised_addrs() if a.tcp_target() and not a.is_loopback()]
            return lan or [a for a in self.host.advertised_addrs() if a.tcp_target()]

        def on_peer(peer: str, addrs: list[Multiaddr]) -> None:
            try:
                send.send_nowait((peer, addrs))
            except trio.WouldBlock:
                pass  # a flood of announcements: drop, the next round repeats them

        mdns = MDNS(self.host.peer_id.to_base58(), announced, on_peer)
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(mdns.run)
            except MDNSError as exc:
                log.warning("mDNS disabled: %s", exc)
                return
            async for peer_text, addrs in receive:
                try:
                    peer = PeerId.from_string(peer_text)
                except LatticeError:
                    continue
                known = self._remember_lan_peer(peer_text, addrs)
                if self.host.connection_to(peer) is None and self._may_dial_lan_peer(peer_text):
                    nursery.start_soon(self._dial_lan_peer, peer, list(known))

    def _remember_lan_peer(self, peer: str, addrs: list[Multiaddr]) -> list[Multiaddr]:
        """Bounded memory of LAN announcements: a spoofer naming thousands of peers only pushes
        out older entries."""
        known = self.mdns_found.pop(peer, [])
        known.extend(a for a in addrs if a not in known)
        del known[16:]
        self.mdns_found[peer] = known
        while len(self.mdns_found) > self.config.mdns_max_peers:
            self.mdns_found.popitem(last=False)
        return known

    def _may_dial_lan_peer(self, peer: str) -> bool:
        """At most ``mdns_max_dials`` dials at once and ``mdns_dials_per_minute`` after a burst,
        never a peer whose dial failed in the last 10 minutes: fake announcements cannot use up
        discovery for good, nor make us dial third parties at their rate."""
        now = time.monotonic()
        until = self._mdns_failed.get(peer)
        if until is not None and until > now:
            return False
        if self._mdns_dialing >= self.config.mdns_max_dials:
            return False
        return self._mdns_bucket.take(now)

    async def _dial_lan_peer(self, peer, addrs: list[Multiaddr]) -> None:
        from lattice.errors import LatticeError

        self._mdns_dialing += 1
        try:
            for addr in addrs[:4]:
                try:
                    await self.host.connect(addr.with_peer(peer), timeout=5.0)
                    log.info("connected to LAN peer %s", peer)
                    return
                except (LatticeError, trio.TooSlowError):
                    continue
            self._mdns_failed[str(peer)] = time.monotonic() + 600.0
            while len(self._mdns_failed) > 1024:
                self._mdns_failed.popitem(last=False)
        finally:
            self._mdns_dialing -= 1

    def status(self) -> dict:
        return {
            "reachability": self.reachability,
            "detected": self.autonat.status(),
            "relays": self.autorelay.status(),
            "relay_discovery": dict(self.autorelay.stats),  # candidates verified / refused
            "relay_service": self.relay_server.status() if self.relay_server else None,
            "port_mapping": _mapping_status(self),
            "lan_peers": len(self.mdns_found) if self.config.mdns else None,
            "hole_punches": {str(p): r for p, r in (self.puncher.results.items() if self.puncher else [])},
        }


def _mapping_status(nat: NATManager) -> dict | None:
    if not nat.config.upnp:
        return None
    m = nat.mapping
    if m is None:
        return {"mapped": False, "error": nat.mapper.last_error if nat.mapper else "not tried yet"}
    return {"mapped": True, "external": f"{m.external_ip}:{m.external_port}", "method": m.method,
            "public": m.is_public}  # fmt: skip


__all__ = ["REACHABILITY_MODES", "NATConfig", "NATManager"]
