"""The libp2p host: TCP listeners and dials, Noise + Yamux upgrades, protocol handlers, peerstore.

Only Noise and Yamux are offered (py-libp2p defects 1 and 6: no Mplex, plaintext or SECIO), dials
go straight to the socket (no happy-eyeballs pause), every upgrade step has a timeout, and the number
of connections and of handshakes in progress is capped so silent or hostile sockets cannot pile up.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import socket
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio

from lattice.errors import (
    ConnectionLost,
    DialError,
    LatticeError,
    NegotiationError,
    ProtocolError,
    TransportError,
)
from lattice.identity import KeyPair, PeerId
from lattice.multiaddr import Multiaddr, MultiaddrError, dialable
from lattice.transport import multistream, noise, scope, yamux
from lattice.transport.limits import PENALTY_MALFORMED, Limits, PeerLimits
from lattice.transport.peerstore import PeerInfo, PeerStore
from lattice.transport.resources import (
    HandshakeTicket,
    ResourceLimitExceeded,
    ResourceLimits,
    ResourceManager,
)
from lattice.transport.stream import Stream

log = logging.getLogger(__name__)

StreamHandler = Callable[[Stream], Awaitable[None]]
RelayedDialer = Callable[[Multiaddr, float | None], Awaitable["Connection"]]


@dataclass
class HostConfig:
    """Transport limits and identities; the node fills it from NodeConfig and the swarm profile."""

    agent_version: str = "lattice/0.1.0"
    protocol_version: str = "lattice/1.0.0"
    # budgets of memory, connections, pending handshakes and streams (lattice.transport.resources)
    resources: ResourceLimits = field(default_factory=ResourceLimits)
    peer_limits: Limits | None = None  # per-IP caps, rate limits, misbehaviour score, bans (limits.py)
    dial_timeout: float = 10.0
    handshake_timeout: float = 10.0  # outbound; inbound ones follow resources.handshake_timeout
    negotiate_timeout: float = 10.0
    stream_window: int = 4 * 1024 * 1024
    # a stream's receive window grows (doubling) up to this while it, not the link, limits a
    # transfer (4 MiB per RTT is 33 MiB/s at 120 ms); the growth is reserved from the peer's budget
    stream_window_max: int = 16 * 1024 * 1024
    noise_ciphers: tuple[str, ...] = noise.TRANSPORT_CIPHERS  # offered beyond ChaChaPoly (Lattice peers)
    max_inbound_streams: int = 512
    # while a large Yamux data frame arrives, a socket read waits (SO_RCVLOWAT) for up to this many of
    # its bytes, never past the frame's end: on paced links a reader wakes per chunk, not per burst
    # of packets (each wake-up costs Python in trio, Yamux and Noise); 0: off
    read_lowat_max: int = 256 * 1024
    write_timeout: float = 30.0
    relay_delay: float = 0.3  # head start of direct addresses over relayed ones when dialing a peer
    # a dial by peer id asks the peer router (DHT) for fresh addresses once the known ones failed,
    # or after this long without a connection (they may be stale: a dead address hangs a whole timeout)
    route_delay: float = 1.0
    verify_timeout: float = 2.0  # connect(verify=True): an existing circuit must answer a ping within
    max_reached_networks: int = 64  # private networks (/24, /64) we had direct connections in (scope)


@dataclass
class Connection:
    """A live, secured, multiplexed connection to one peer."""

    session: yamux.YamuxSession
    remote_peer: PeerId
    remote_addr: Multiaddr
    local_addr: Multiaddr | None
    direction: str  # "inbound" | "outbound"
    opened_at: float = field(default_factory=time.time)
    rtt: float | None = None
    # A reachability probe (an AutoNAT dial-back, closed by its dialer right after): never chosen
    # by connection_to, so a call made meanwhile does not land on a connection about to close.
    probe: bool = False
    ip: str | None = None  # the remote IP of a direct connection (what its budgets count against)
    muxer_in_handshake: bool = False  # Yamux agreed inside the Noise handshake (no multistream round trip)
    cipher: str = noise.CHACHAPOLY  # of the Noise transport messages (AESGCM between Lattice nodes)

    @property
    def closed(self) -> bool:
        return self.session.closed

    @property
    def relayed(self) -> bool:
        return self.remote_addr.is_relayed

    async def close(self) -> None:
        await self.session.aclose()

    async def wait_closed(self) -> None:
        await self.session.wait_closed()

    def stats(self) -> dict:
        return {
            "addr": str(self.remote_addr),
            "direction": self.direction,
            "relayed": self.relayed,
            "streams": self.session.num_streams,
            "age_s": round(time.time() - self.opened_at, 1),
            # payload decrypted straight into a reader's tensor (the rest was copied once more)
            "bytes_in_place": self.session.bytes_in_place,
            "muxer_in_handshake": self.muxer_in_handshake,
            "cipher": self.cipher,
        }


_IFACE_TTL = 5.0  # interface addresses are re-read at most this often (reading costs ~0.2 ms)
_iface_cache: dict[str, tuple[float, list[str]]] = {}


def _interface_ips(net: str) -> list[str]:
    """This machine's addresses of family ``net`` (loopback first); cached briefly, because every
    identify, DHT self-lookup and hole punch asks, and a changed network shows within seconds."""
    now = time.monotonic()
    cached = _iface_cache.get(net)
    if cached is not None and now - cached[0] < _IFACE_TTL:
        return cached[1]
    ips = _read_interface_ips(net)
    _iface_cache[net] = (now, ips)
    return ips


def _read_interface_ips(net: str) -> list[str]:
    ips = [ip for ip, _ in _read_interfaces(net)]
    return sorted(set(ips), key=lambda a: (not a.startswith("127.") and a != "::1", a))


def _read_interfaces(net: str) -> list[tuple[str, int]]:
    """(address, prefix length) of each interface address of family ``net`` (no IPv6 link-local)."""
    import ifaddr  # lazily: only needed when listening on a wildcard address or dialing by peer id

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if net == "ip4" and isinstance(ip.ip, str):
                out.append((ip.ip, ip.network_prefix))
            elif net == "ip6" and isinstance(ip.ip, tuple) and not ip.ip[0].startswith("fe80"):
                out.append((ip.ip[0], ip.network_prefix))
    return out


_nets_cache: dict[str, tuple[float, list[scope.IPNetwork]]] = {}


def _interface_networks(net: str) -> list[scope.IPNetwork]:
    """The networks of this machine's interfaces of family ``net`` (cached like the addresses)."""
    now = time.monotonic()
    cached = _nets_cache.get(net)
    if cached is not None and now - cached[0] < _IFACE_TTL:
        return cached[1]
    nets = []
    for ip, prefix in _read_interfaces(net):
        try:
            nets.append(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
        except ValueError:
            continue
    _nets_cache[net] = (now, nets)
    return nets


def sockaddr_to_multiaddr(sockaddr) -> Multiaddr:
    host, port = sockaddr[0], sockaddr[1]
    proto = "ip6" if ":" in host else "ip4"
    return Multiaddr(((proto, host.split("%")[0]), ("tcp", str(port))))


class Host:
    """Use through :func:`open_host`; all tasks live in the host's nursery."""

    def __init__(self, keypair: KeyPair, config: HostConfig, nursery: trio.Nursery) -> None:
        self.keypair = keypair
        self.peer_id = keypair.peer_id
        self.config = config
        self._nursery = nursery
        self._handlers: dict[str, StreamHandler] = {}
        self._conns: dict[PeerId, list[Connection]] = {}
        self._dialing: dict[PeerId, trio.Event] = {}
        self._listeners: list[trio.SocketListener] = []
        self._paused: list[trio.SocketListener] = []
        self.listen_addrs: list[Multiaddr] = []
        self.resources = ResourceManager(config.resources)
        self.peerstore = PeerStore(config.resources.peerstore_peers, config.resources.peerstore_addrs)
        self.peerstore.keep(self._conns.__contains__)  # connected peers stay
        self.peerstore.on_remove(self._forget_peer)
        self.observed_addrs: Counter[Multiaddr] = Counter()
        self._connect_callbacks: list[Callable[[Connection], None]] = []
        self._disconnect_callbacks: list[Callable[[Connection], None]] = []
        self._closed = False
        self._identified: dict[PeerId, trio.Event] = {}
        self._identify_callbacks: list[Callable[[PeerInfo], None]] = []
        self.counters: Counter[str] = Counter()  # transport events (connections, refusals): stats()
        self.limits = PeerLimits(config.peer_limits) if config.peer_limits is not None else None
        self.traffic_in: Counter = Counter()  # payload bytes per protocol, all connections (metrics)
        self.traffic_out: Counter = Counter()
        # Finds a peer's current addresses when ours fail or are missing (the DHT installs one).
        self.peer_router: Callable[[PeerId], Awaitable[list[Multiaddr]]] | None = None
        self._address_sources: list[Callable[[], list[Multiaddr]]] = []
        self._probes_from: dict[PeerId, float] = {}  # peer -> until when we expect its dial-back
        self._relayed_dialer: RelayedDialer | None = None  # installed by lattice.nat.circuit
        self._arrivals: dict[PeerId, list[trio.Event]] = {}  # peer -> tasks waiting for a connection
        self._reached: OrderedDict[scope.IPNetwork, None] = OrderedDict()  # private networks we reached

    # -- handlers and events
    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self._handlers[protocol] = handler

    def remove_stream_handler(self, protocol: str) -> None:
        self._handlers.pop(protocol, None)

    @property
    def protocols(self) -> list[str]:
        return sorted(self._handlers)

    def on_connect(self, callback: Callable[[Connection], None]) -> None:
        self._connect_callbacks.append(callback)

    def on_disconnect(self, callback: Callable[[Connection], None]) -> None:
        self._disconnect_callbacks.append(callback)

    def on_identify(self, callback: Callable[[PeerInfo], None]) -> None:
        """Call ``callback(info)`` each time a peer's identify info arrives (protocols, addresses)."""
        self._identify_callbacks.append(callback)

    def identified(self, peer: PeerId) -> None:
        """Called by identify when a peer's info is fresh; wakes :meth:`wait_identified`."""
        info = self.peerstore.get(peer)
        if info is None:  # evicted meanwhile: no event may outlive its peer
            return
        self._identified.setdefault(peer, trio.Event()).set()
        for callback in self._identify_callbacks:
            callback(info)

    async def wait_identified(self, peer: PeerId, timeout: float = 10.0) -> PeerInfo:
        event = self._identified.setdefault(peer, trio.Event())
        try:
            with trio.fail_after(timeout):
                await event.wait()
        finally:
            if not event.is_set() and peer not in self.peerstore and self._identified.get(peer) is event:
                del self._identified[peer]  # a peer we never met: its event must not stay behind
        info = self.peerstore.get(peer)
        if info is None:
            raise DialError(f"{peer} was identified but is no longer known (not connected)")
        return info

    def _forget_peer(self, peer: PeerId) -> None:
        """A peer left the peer store: its identify event goes with it."""
        self._identified.pop(peer, None)

    def note_observed(self, addr: Multiaddr, keep: int = 64) -> None:
        """Count an address a peer observed for us (identify). At most ``keep`` distinct ones are
        remembered: peers choose what they report, so the least reported make room."""
        self.observed_addrs[addr] += 1
        if len(self.observed_addrs) > keep:
            for old, _ in self.observed_addrs.most_common()[keep // 2 :]:
                if old != addr:
                    del self.observed_addrs[old]

    def set_relayed_dialer(self, dialer: RelayedDialer) -> None:
        """Dial ``/p2p-circuit`` addresses with ``dialer`` (NAT traversal installs it: the circuit
        relay lives above the host)."""
        self._relayed_dialer = dialer

    def add_address_source(self, source: Callable[[], list[Multiaddr]]) -> None:
        """Addresses to advertise beyond the listen ones (public ones found by NAT detection or port
        mapping, relayed ones)."""
        self._address_sources.append(source)

    def advertised_addrs(self) -> list[Multiaddr]:
        """Listen addresses as peers can dial them (wildcards expanded to interfaces), then those
        of the address sources."""
        out: list[Multiaddr] = []
        for addr in self.listen_addrs:
            net, ip = addr.parts[0]
            if ip in ("0.0.0.0", "::"):
                port = addr.parts[1][1]
                for iface_ip in _interface_ips(net):
                    out.append(Multiaddr(((net, iface_ip), ("tcp", port))))
            else:
                out.append(addr)
        for source in self._address_sources:
            out.extend(a for a in source() if a not in out)
        return out

    # -- listening
    async def listen(self, addr: Multiaddr | str, accept: bool = True) -> list[Multiaddr]:
        """Bind ``addr``; with ``accept=False`` connections queue until :meth:`start_accepting`
        (a node binds first, so a busy port fails fast, and accepts once its services are ready)."""
        addr = Multiaddr.parse(str(addr))
        target = addr.tcp_target()
        if target is None or addr.parts[0][0] not in ("ip4", "ip6"):
            raise MultiaddrError(f"cannot listen on {addr}: only /ip4|ip6/.../tcp/PORT is supported")
        host, port = target
        try:
            listeners = [await _open_listener(host, port)]
        except OSError as exc:
            raise TransportError(f"cannot listen on {addr}: {exc.strerror or exc}") from None
        bound = []
        for listener in listeners:
            self._listeners.append(listener)
            maddr = sockaddr_to_multiaddr(listener.socket.getsockname())
            bound.append(maddr)
            self.listen_addrs.append(maddr)
            if accept:
                self._nursery.start_soon(self._serve, listener)
            else:
                self._paused.append(listener)
        return bound

    def start_accepting(self) -> None:
        for listener in self._paused:
            self._nursery.start_soon(self._serve, listener)
        self._paused.clear()

    async def _serve(self, listener: trio.SocketListener) -> None:
        # The raw accept (not listener.accept()): a refused socket is closed at once, with no
        # SocketStream, getpeername or checkpointed aclose, so a banned IP's re-dials cost little.
        lsock = listener.socket
        while not self._closed:
            try:
                sock, sockaddr = await lsock.accept()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            except OSError as exc:
                if self._closed or lsock.fileno() == -1:
                    return
                if exc.errno in _TRANSIENT_ACCEPT_ERRNOS:  # that one connection failed: next
                    continue
                log.warning("accept failed: %s", exc)  # EMFILE and friends: back off, do not spin
                await trio.sleep(0.1)
                continue
            ip = str(sockaddr[0]).split("%")[0] if sockaddr else ""
            if self.limits is not None and not self.limits.accept_ip(ip):
                self.counters["inbound_refused_limits"] += 1
                _refuse(sock)
                continue
            ticket = self.resources.begin_handshake(ip) if self.resources.accepting() else None
            if ticket is None:  # full, or its IP or prefix holds its share of pending handshakes
                self.counters["inbound_refused"] += 1
                if self.limits is not None:
                    self.limits.release_ip(ip)
                _refuse(sock)
                continue
            self._nursery.start_soon(self._handle_inbound, trio.SocketStream(sock), ip, ticket)

    async def _handle_inbound(self, stream: trio.SocketStream, ip: str, ticket: HandshakeTicket) -> None:
        try:
            await self._handle_inbound_counted(stream, ip, ticket)
        finally:
            self.resources.end_handshake(ticket)  # if still pending (an early error)
            if self.limits is not None:
                self.limits.release_ip(ip)

    async def _handle_inbound_counted(
        self, stream: trio.SocketStream, ip: str, ticket: HandshakeTicket
    ) -> None:
        try:
            remote = sockaddr_to_multiaddr(stream.socket.getpeername())
            local = sockaddr_to_multiaddr(stream.socket.getsockname())
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        try:
            with trio.CancelScope(deadline=trio.current_time() + ticket.timeout) as scope:
                ticket.evict = scope.cancel  # a newer handshake may take this slot (resources)
                secure, leftover = await upgrade(
                    stream, self.keypair, outbound=False, ciphers=self.config.noise_ciphers
                )
        except (TransportError, OSError, trio.BrokenResourceError) as exc:
            self.counters["inbound_handshake_failed"] += 1
            log.debug("inbound handshake from %s failed: %s", remote, exc)
            await trio.aclose_forcefully(stream)
            return
        finally:
            self.resources.end_handshake(ticket)
        if scope.cancelled_caught:
            self.counters["inbound_handshake_failed"] += 1
            self.counters["inbound_handshake_timeout"] += 1
            await trio.aclose_forcefully(stream)
            return
        if self.limits is not None and not self.limits.accept_peer(secure.remote_peer, remote.ip):
            self.counters["inbound_refused_banned"] += 1
            await trio.aclose_forcefully(stream)
            return
        try:
            self.resources.open_connection(secure.remote_peer, ip)
        except ResourceLimitExceeded as exc:
            self.counters["inbound_refused_resources"] += 1
            log.debug("refused a connection of %s: %s", secure.remote_peer, exc)
            await trio.aclose_forcefully(stream)
            return
        conn = self._make_connection(secure, False, remote, local, leftover)
        conn.ip = ip
        await self._run_connection(conn)

    # -- dialing
    async def connect(self, addr: Multiaddr | str, timeout: float | None = None) -> Connection:
        """Connect to ``addr`` (reusing a live connection to its peer if there is one)."""
        addr = Multiaddr.parse(str(addr))
        expected = addr.peer_id
        if expected == self.peer_id:
            raise DialError("cannot dial ourselves")
        target = addr.tcp_target()
        if target is not None and addr.ip is not None and (addr.ip, target[1]) in self.vantage().own:
            raise DialError(f"cannot dial {addr}: it is one of this node's own listen addresses")
        return await self._shared_dial(expected, lambda: self._connect_addr(addr, expected, timeout), timeout)

    async def _shared_dial(
        self, peer: PeerId | None, dial: Callable[[], Awaitable[Connection]], timeout: float | None
    ) -> Connection:
        """Reuse a live connection to ``peer``, or join a dial already under way (until it ends or
        the peer connects some other way), or run ``dial``."""
        if peer is None:
            return await dial()
        conn = self.connection_to(peer)
        if conn is not None:
            return conn
        pending = self._dialing.get(peer)
        if pending is not None:  # someone is dialing this peer already: share the result
            with trio.move_on_after(timeout or self.config.dial_timeout) as waited:
                await _first_of(pending.wait, functools.partial(self.wait_connected, peer))
            conn = self.connection_to(peer)
            if conn is not None:
                return conn
            if waited.cancelled_caught:
                raise DialError(f"dialing {peer} timed out (joined a dial already under way)")
        event = trio.Event()
        self._dialing[peer] = event
        try:
            return await dial()
        finally:
            event.set()
            if self._dialing.get(peer) is event:
                del self._dialing[peer]

    async def wait_connected(self, peer: PeerId) -> Connection:
        """Wait until a usable connection to ``peer`` exists, whoever made it (our dial, the peer's,
        a hole punch); the caller bounds the time."""
        while True:
            conn = self.connection_to(peer)
            if conn is not None:
                return conn
            event = trio.Event()
            waiters = self._arrivals.setdefault(peer, [])
            waiters.append(event)
            try:
                await event.wait()
            finally:
                if event in waiters:
                    waiters.remove(event)
                if not waiters and self._arrivals.get(peer) is waiters:
                    del self._arrivals[peer]

    def _arrived(self, conn: Connection) -> None:
        for event in self._arrivals.pop(conn.remote_peer, ()):
            event.set()

    # -- address scope
    def vantage(self) -> scope.Vantage:
        """Where this host stands (its listen endpoints, interfaces and the private networks it
        reached): what decides which of a peer's addresses can reach it (lattice.transport.scope)."""
        own: set[tuple[str, int]] = set()
        local: set[str] = set()
        networks: list[scope.IPNetwork] = []
        for net in ("ip4", "ip6"):
            ips = _interface_ips(net)
            local.update(ips)
            networks.extend(_interface_networks(net))
            for addr in self.listen_addrs:
                if addr.parts[0][0] != net:
                    continue
                ip, port = addr.parts[0][1] or "", int(addr.parts[1][1] or 0)
                own.update((i, port) for i in (ips if ip in ("0.0.0.0", "::") else [ip]))
        networks.extend(n for n in self._reached if n not in networks)
        return scope.Vantage(frozenset(own), frozenset(local), tuple(networks))

    def plausible_addrs(self, addrs: Sequence[Multiaddr]) -> list[Multiaddr]:
        """The addresses of one peer that can plausibly reach it from here (see
        lattice.transport.scope): never our own, loopback only on this machine, private ones only
        within a network we share."""
        return scope.plausible(addrs, self.vantage())

    def _note_reached(self, remote: Multiaddr, local: Multiaddr | None) -> None:
        """A direct connection with a private address: its network is one we share (bounded, the
        most recent kept)."""
        if remote.is_relayed or remote.ip is None:
            return
        network = scope.network_of(remote.ip, local.ip if local is not None else None)
        if network is None:
            return
        self._reached[network] = None
        self._reached.move_to_end(network)
        while len(self._reached) > self.config.max_reached_networks:
            self._reached.popitem(last=False)

    async def _connect_addr(
        self, addr: Multiaddr, expected: PeerId | None, timeout: float | None
    ) -> Connection:
        target = addr.tcp_target()
        if target is None and not addr.is_relayed:
            raise DialError(f"cannot dial {addr}: neither a TCP address nor a relayed one")
        if target is None:
            if self._relayed_dialer is None:
                raise DialError(f"cannot dial {addr}: this host has no circuit relay dialer")
            return await self._relayed_dialer(addr, timeout)
        return await self._dial(addr, target, expected, timeout or self.config.dial_timeout)

    async def _dial(self, addr: Multiaddr, target, expected: PeerId | None, timeout: float) -> Connection:
        host, port = target
        try:
            with trio.fail_after(timeout):
                stream = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise DialError(f"dialing {addr} timed out after {timeout:.1f}s") from None
        except OSError as exc:
            raise DialError(f"cannot connect to {addr}: {exc.strerror or exc}") from None
        return await self.adopt(stream, True, addr.without_peer(), expected, timeout)

    async def adopt(
        self,
        stream: trio.abc.Stream,
        outbound: bool,
        remote: Multiaddr,
        expected: PeerId | None = None,
        timeout: float | None = None,
        probe: bool = False,
    ) -> Connection:
        """Secure and multiplex an open byte stream (a TCP socket, a relayed circuit, a hole-punched
        socket), then run it as a connection of this host. ``outbound`` picks the Noise initiator
        and Yamux client role; on failure the stream is closed and DialError raised. ``probe``: a
        short-lived reachability probe that other traffic must not use (see Connection.probe)."""
        timeout = timeout or self.config.handshake_timeout
        try:
            with trio.fail_after(timeout):
                secure, leftover = await upgrade(
                    stream, self.keypair, outbound, expected, ciphers=self.config.noise_ciphers
                )
        except trio.TooSlowError:
            await trio.aclose_forcefully(stream)
            raise DialError(f"handshake with {remote} timed out after {timeout:.1f}s") from None
        except (TransportError, OSError, trio.BrokenResourceError) as exc:
            await trio.aclose_forcefully(stream)
            raise DialError(f"handshake with {remote} failed: {exc}") from None
        except BaseException:  # cancelled half-way (a lost dial race): the peer must see it end too
            await trio.aclose_forcefully(stream)
            raise
        if self.limits is not None and self.limits.is_banned(secure.remote_peer):
            await trio.aclose_forcefully(stream)
            raise DialError(f"{secure.remote_peer} is banned")
        sock = getattr(stream, "socket", None)
        try:
            local = sockaddr_to_multiaddr(sock.getsockname()) if sock is not None else None
        except OSError:
            local = None
        ip = None if remote.is_relayed else remote.ip  # a relayed peer is not at the relay's IP
        try:
            self.resources.open_connection(secure.remote_peer, ip)
        except ResourceLimitExceeded as exc:
            await trio.aclose_forcefully(stream)
            raise DialError(f"no room for a connection to {secure.remote_peer}: {exc}") from None
        conn = self._make_connection(secure, outbound, remote, local, leftover, probe)
        conn.ip = ip
        ready = trio.Event()

        async def run() -> None:
            ready.set()
            await self._run_connection(conn)

        self._nursery.start_soon(run)
        await ready.wait()
        return conn

    # -- connections
    def _make_connection(
        self, secure, outbound: bool, remote, local, leftover: bytes, probe: bool = False
    ) -> Connection:
        cfg = self.config
        conn_ref: list[Connection] = []
        session = yamux.YamuxSession(
            secure,
            is_client=outbound,
            on_stream=lambda s: self._nursery.start_soon(self._handle_stream, conn_ref[0], s),
            window=cfg.stream_window,
            max_inbound_streams=cfg.max_inbound_streams,
            write_timeout=cfg.write_timeout,
            initial_data=leftover,
            resources=self.resources,
            max_window=cfg.stream_window_max,
            rtt=functools.partial(tcp_rtt, secure.raw),
            read_lowat_max=cfg.read_lowat_max,
        )
        session.traffic_in, session.traffic_out = self.traffic_in, self.traffic_out
        conn = Connection(session, secure.remote_peer, remote, local, "outbound" if outbound else "inbound")
        conn.muxer_in_handshake = secure.muxer is not None
        conn.cipher = secure.cipher
        conn.probe = probe or (
            not outbound and self._probes_from.get(conn.remote_peer, -1.0) > trio.current_time()
        )
        conn_ref.append(conn)
        self._conns.setdefault(conn.remote_peer, []).append(conn)
        self._note_reached(remote, local)
        info = self.peerstore.add(conn.remote_peer)
        info.public_key = secure.remote_public_key
        info.last_seen = time.time()
        self.counters["connections_opened"] += 1
        for callback in self._connect_callbacks:
            callback(conn)
        if not conn.probe:
            self._arrived(conn)
        return conn

    async def _run_connection(self, conn: Connection) -> None:
        try:
            await conn.session.run()
        except Exception:  # a bug handling one peer must not take the host down
            log.exception("connection to %s failed unexpectedly", conn.remote_peer)
            await trio.aclose_forcefully(conn.session.secure.raw)
        finally:
            self.resources.close_connection(conn.remote_peer, conn.ip)
            self.counters["dropped_replies"] += conn.session.dropped_replies
            self.counters["refused_streams"] += conn.session.refused_streams
            if (conn.session.close_reason or "").startswith("protocol error"):
                self.penalize(conn.remote_peer, f"yamux {conn.session.close_reason}")
            conns = self._conns.get(conn.remote_peer, [])
            if conn in conns:
                conns.remove(conn)
            if not conns:
                self._conns.pop(conn.remote_peer, None)
            for callback in self._disconnect_callbacks:
                callback(conn)

    async def connect_peer(
        self, peer: PeerId, timeout: float | None = None, route: bool = True, verify: bool = False
    ) -> Connection:
        """A live connection to ``peer``: the existing one, or a dial of the addresses we know that
        can plausibly reach it (:meth:`plausible_addrs`); with ``route``, also of those the peer
        router (DHT) finds, or else through the relays we hold reservations on, once the known ones
        failed or after ``route_delay`` (they may be stale).
        The DHT's own requests pass ``route=False``: a stale contact must not start a lookup whose
        requests start lookups in turn. Direct addresses are tried at once, relayed ones after
        ``relay_delay``; the first connection wins, also one the peer or a hole punch made meanwhile.
        ``verify``: an existing relayed connection must answer a ping first (a relay that vanished
        without a FIN leaves circuits that look alive); one that does not is closed and the peer
        dialed."""
        if peer == self.peer_id:
            raise DialError("cannot dial ourselves")
        timeout = timeout or self.config.dial_timeout
        conn = self.connection_to(peer)
        for _ in range(2 if verify else 0):  # a second connection may be a circuit via the same relay
            if conn is None or not conn.relayed:
                break
            if await self._alive(conn, min(self.config.verify_timeout, timeout / 2)):
                break
            conn = self.connection_to(peer)
        if conn is not None:
            return conn
        if self.limits is not None and self.limits.is_banned(peer):
            raise DialError(f"{peer} is banned")
        info = self.peerstore.get(peer)
        known = self.plausible_addrs(
            [a for a in (info.addrs if info else []) if a.tcp_target() or a.is_relayed]
        )
        dial = _PeerDial(peer, known, timeout, route)
        with trio.move_on_after(timeout):
            await self._dial_peer(dial)
        if dial.won is not None:
            return dial.won
        raise DialError(dial.failure(self.peer_router is not None))

    async def _dial_peer(self, dial: _PeerDial) -> None:
        """The known addresses (a dial other callers may join), and with ``route`` those the router
        finds; ends when a connection to the peer exists, whoever made it, or all attempts failed."""
        async with trio.open_nursery() as nursery:

            def finish(conn: Connection) -> None:
                dial.won = conn
                nursery.cancel_scope.cancel()

            async def arrival() -> None:
                finish(await self.wait_connected(dial.peer))

            async def tries() -> None:
                async with trio.open_nursery() as inner:
                    inner.start_soon(self._dial_known, dial, finish)
                    if dial.route:
                        inner.start_soon(self._dial_routed, dial, finish)
                nursery.cancel_scope.cancel()

            nursery.start_soon(arrival)
            nursery.start_soon(tries)

    async def _dial_known(self, dial: _PeerDial, finish: Callable[[Connection], None]) -> None:
        try:
            if dial.known:
                race = functools.partial(self._connect_addrs, dial.peer, dial.known, dial.timeout)
                finish(await self._shared_dial(dial.peer, race, dial.timeout))
        except DialError as exc:
            dial.errors.append(str(exc))
        finally:
            dial.known_done.set()

    async def _dial_routed(self, dial: _PeerDial, finish: Callable[[Connection], None]) -> None:
        """After ``route_delay`` (or once the known addresses failed): what the router finds, else
        the relays we hold reservations on."""
        peer = dial.peer
        with trio.move_on_after(self.config.route_delay):
            await dial.known_done.wait()
        found = await self.peer_router(peer) if self.peer_router is not None else []
        dial.routed = self.plausible_addrs(found)
        fresh = [a for a in dial.routed if a not in dial.known]
        guesses: list[Multiaddr] = []
        if not any(a.is_relayed for a in fresh):  # direct ones may be dead too (tried first)
            guesses = self.plausible_addrs(self._via_our_relays(peer, dial.known + fresh))
        if not fresh and not guesses:
            return
        try:
            finish(await self._connect_addrs(peer, fresh + guesses, dial.timeout))
        except DialError as exc:
            if dial.known or dial.routed:
                dial.errors.append(str(exc))
            else:  # only guessed: the peer is unknown, whatever the relays said
                dial.guessed = "no reservation" if "no reservation" in str(exc) else "no answer"

    async def _alive(self, conn: Connection, timeout: float) -> bool:
        """Does ``conn`` answer a ping within ``timeout`` (or receive data meanwhile)? If not, it
        is closed."""
        before = conn.session.bytes_received
        try:
            await conn.session.ping(timeout=timeout)
            return True
        except (LatticeError, trio.TooSlowError):
            if conn.session.bytes_received != before and not conn.closed:
                return True  # busy, not dead: a ping waits behind its data
            if not conn.closed and tcp_stalled(conn.session.carrier(), timeout / 2) is False:
                return True  # the path acknowledges: the peer is slow (a busy machine), not gone
        log.info(
            "connection to %s via %s did not answer a ping: closing it", conn.remote_peer, conn.remote_addr
        )
        await _close_quietly(conn)  # a GO_AWAY is tried for 1 s at most
        return False

    def _via_our_relays(self, peer: PeerId, known: list[Multiaddr]) -> list[Multiaddr]:
        """Last resort when a peer's published addresses fail and the DHT knows no relayed address
        for it (not propagated yet), only direct ones that may be just as dead: the relays we hold
        reservations on, which NATed peers of a swarm often share (its bootstrap relays). A relay
        without a reservation for ``peer`` refuses at once, so this costs one round trip."""
        out: list[Multiaddr] = []
        for addr in self.advertised_addrs():
            if addr.is_relayed:
                candidate = addr.with_peer(peer)
                if candidate not in known and candidate not in out:
                    out.append(candidate)
        return out[:2]

    async def _connect_addrs(self, peer: PeerId, addrs: list[Multiaddr], timeout: float | None) -> Connection:
        """Race ``addrs`` (see :meth:`connect_peer`); the first connection to ``peer`` wins, ours or
        one the peer opened meanwhile. Then attempts not started yet are dropped, and those under
        way finish in the background: cut mid-handshake, the peer would lose a connection it
        already counts as made (a hole punch over it then fails)."""
        addrs = dialable(addrs)
        direct = [a for a in addrs if not a.is_relayed][:4]
        relayed = [a for a in addrs if a.is_relayed][:2]
        plan = [(a, 0.0) for a in direct] + [(a, self.config.relay_delay if direct else 0.0) for a in relayed]
        if not plan:
            raise DialError(f"cannot reach {peer}: none of its addresses is a TCP or relayed one")
        race = _Race(len(plan))
        for addr, delay in plan:
            self._nursery.start_soon(self._attempt, race, peer, addr, delay, timeout)
        try:
            await _first_of(race.done.wait, functools.partial(self.wait_connected, peer))
        finally:
            race.settled = True
        conn = race.won[0] if race.won else self.connection_to(peer)
        if conn is not None:
            return conn
        if len(race.errors) == 1:
            raise DialError(race.errors[0])
        raise DialError(f"cannot reach {peer}: " + "; ".join(race.errors[:3]))

    async def _attempt(
        self, race: _Race, peer: PeerId, addr: Multiaddr, delay: float, timeout: float | None
    ) -> None:
        """One address of a race; the first to connect cancels the others (a lost race)."""
        try:
            with trio.CancelScope() as scope:
                race.scopes.append(scope)
                await trio.sleep(delay)
                if race.settled:
                    return
                try:
                    conn = await self._connect_addr(addr.with_peer(peer), peer, timeout)
                except DialError as exc:
                    race.errors.append(str(exc))
                    return
                race.won.append(conn)
                for other in race.scopes:
                    if other is not scope:
                        other.cancel()
        finally:
            race.remaining -= 1
            if race.won or race.remaining == 0:
                race.done.set()

    def connection_to(self, peer: PeerId) -> Connection | None:
        """The connection streams should use: a direct one if there is one, else a relayed one."""
        relayed = None
        for conn in self._conns.get(peer, ()):
            if not conn.closed and not conn.probe and not conn.session.going_away:
                if not conn.relayed:
                    return conn
                relayed = relayed or conn
        return relayed

    def expect_probe(self, peer: PeerId, seconds: float) -> None:
        """For ``seconds``, inbound connections from ``peer`` are probes: the dial-back of a
        reachability check we asked it for, which its dialer closes right after. The window
        outlasts the check, since the dial-back may still come after we gave up waiting."""
        now = trio.current_time()
        if len(self._probes_from) >= 1024:
            self._probes_from = {p: t for p, t in self._probes_from.items() if t > now}
        self._probes_from[peer] = max(self._probes_from.get(peer, now), now + seconds)

    def connection_of(self, stream: Stream) -> Connection | None:
        """The connection a stream belongs to."""
        for conn in self._conns.get(stream.remote_peer, ()):
            if conn.session is stream.session:
                return conn
        return None

    def connections(self) -> list[Connection]:
        return [c for conns in self._conns.values() for c in conns if not c.closed]

    def connections_to(self, peer: PeerId) -> list[Connection]:
        """Every connection to ``peer``, direct and relayed (probes and closing ones included)."""
        return list(self._conns.get(peer, ()))

    @property
    def num_connections(self) -> int:
        return sum(len(c) for c in self._conns.values())

    def connected_peers(self) -> list[PeerId]:
        return [p for p, conns in self._conns.items() if any(not c.closed for c in conns)]

    async def disconnect(self, peer: PeerId) -> None:
        for conn in list(self._conns.get(peer, ())):
            await conn.close()

    # -- streams
    async def new_stream(
        self,
        peer: PeerId | Connection,
        protocols: Sequence[str],
        timeout: float | None = None,
        *,
        lazy: bool = False,
    ) -> Stream:
        """Open a stream to a connected peer and negotiate the first protocol it accepts.

        ``lazy=True`` (one protocol) does not wait: the proposal goes out in front of the first
        write, and the caller reads the answer with ``multistream.confirm`` before the reply (one
        round trip for a whole call: what the RPC does)."""
        conn = peer if isinstance(peer, Connection) else self.connection_to(peer)
        if conn is None:
            raise DialError(f"not connected to {peer}")
        stream = await conn.session.open_stream()
        if lazy:
            (protocol,) = protocols
            stream.protocol = protocol
            stream.pending_prefix = multistream.proposal(protocol)
            return stream
        try:
            with trio.fail_after(timeout or self.config.negotiate_timeout):
                buf = bytearray()
                stream.protocol = await multistream.select_outbound(stream, protocols, buf)
        except BaseException as exc:
            await stream.reset()
            if isinstance(exc, trio.TooSlowError):
                raise NegotiationError(f"protocol negotiation with {conn.remote_peer} timed out") from None
            raise
        stream.unread(bytes(buf))
        _recount(conn.session, stream.protocol, stream.buffered)
        return stream

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run ``fn(*args)`` in the host's nursery: a task that lives with the host, not with its
        caller (identify of a new connection, a hole punch, a keep-alive probe)."""
        self._nursery.start_soon(fn, *args)

    # -- state, for status pages and /metrics (Node.status and peers, lattice.observe.metrics)
    def stats(self) -> dict:
        """The host's counters and gauges, JSON-able."""
        conns = self.connections()
        direct = {c.remote_peer for c in conns if not c.relayed}
        peers = {c.remote_peer for c in conns}
        return {
            "peers": len(peers),
            "connections": len(conns),
            "paths": {str(p): "direct" if p in direct else "relayed" for p in peers},
            "direct_peers": len(direct),
            "relayed_peers": len(peers - direct),
            "bytes_in": sum(c.session.bytes_received for c in conns),
            "bytes_out": sum(c.session.bytes_sent for c in conns),
            "traffic_in": {_proto_name(k): v for k, v in self.traffic_in.items()},
            "traffic_out": {_proto_name(k): v for k, v in self.traffic_out.items()},
            "events": dict(self.counters),
            "observed_addrs": [str(a) for a, _ in self.observed_addrs.most_common(4)],
            "peerstore": self.peerstore.status(),
            "resources": self.resource_stats(),
            "limits": self.limits.status() if self.limits is not None else None,
        }

    def peer_stats(self, peer: PeerId) -> dict | None:
        """A connected peer, JSON-able (None if not connected): the connection streams use, what
        identify said, every live connection and the bytes they carried."""
        conn = self.connection_to(peer)
        if conn is None:
            return None
        info = self.peerstore.get(peer)
        live = [c for c in self._conns.get(peer, ()) if not c.closed]
        return {
            "peer_id": str(peer),
            "addr": str(conn.remote_addr),
            "direction": conn.direction,
            "relayed": conn.relayed,
            "rtt_ms": round(conn.rtt * 1000, 3) if conn.rtt is not None else None,
            "agent": info.agent_version if info else "",
            "listen_addrs": [str(a) for a in info.addrs] if info else [],
            "protocols": info.protocols if info else [],
            "streams": conn.session.num_streams,
            "connections": [c.stats() for c in live],
            "connected_for_s": round(time.time() - conn.opened_at, 1),
            "bytes_in": sum(c.session.bytes_received for c in live),
            "bytes_out": sum(c.session.bytes_sent for c in live),
        }

    def resource_stats(self) -> dict:
        """The budgets and their use (lattice.transport.resources), with what the muxer refused:
        streams over a budget and replies dropped because a peer did not read them."""
        live = self.connections()
        out = self.resources.stats()
        counted = self.counters
        out["dropped_replies"] = counted["dropped_replies"] + sum(c.session.dropped_replies for c in live)
        out["refused_streams"] = counted["refused_streams"] + sum(c.session.refused_streams for c in live)
        return out

    # -- limits (no-ops without self.limits)
    def allow_request(self, peer: PeerId, protocol: str) -> bool:
        """One request of ``protocol`` from ``peer`` within its rate limit? (services with long-lived
        streams ask per request; the host asks per stream)."""
        if self.limits is None or self.limits.allow(peer, protocol):
            return True
        self.enforce_ban(peer)
        return False

    def penalize(self, peer: PeerId, reason: str, points: float = PENALTY_MALFORMED) -> None:
        """Report misbehaviour (a malformed message); enough of it bans the peer (see limits)."""
        log.debug("peer %s misbehaved: %s", peer, reason)
        if self.limits is not None and self.limits.penalize(peer, points, reason):
            self.enforce_ban(peer)

    def enforce_ban(self, peer: PeerId) -> None:
        """Close the connections of ``peer`` if it is banned now (after a ban by the operator)."""
        if self.limits is not None and self.limits.is_banned(peer) and self._conns.get(peer):
            log.warning("banned peer %s: %s", peer, self.limits.ban_reasons.get(str(peer), ""))
            for conn in list(self._conns.get(peer, ())):
                self._nursery.start_soon(_close_quietly, conn)

    async def _handle_stream(self, conn: Connection, stream: yamux.YamuxStream) -> None:
        limits = self.limits
        if limits is not None and not limits.allow_stream(conn.remote_peer):
            self.enforce_ban(conn.remote_peer)
            await stream.reset()
            return
        buf = bytearray()
        try:
            with trio.fail_after(self.config.negotiate_timeout):
                proto, accept = await multistream.select_inbound(
                    stream, self._handlers.__contains__, buf, defer_accept=True
                )
                # A dialer that pipelined data after its proposal is not waiting for our answer: let
                # the answer ride on the handler's first write. Otherwise answer now.
                if buf:
                    stream.pending_prefix = accept
                else:
                    await stream.write(accept)
        except (trio.TooSlowError, TransportError) as exc:
            log.debug("stream negotiation with %s failed: %s", conn.remote_peer, exc)
            await stream.reset()
            return
        stream.protocol = proto
        stream.unread(bytes(buf))
        _recount(conn.session, proto, stream.buffered)
        handler = self._handlers.get(proto)
        if handler is None or not self.allow_request(conn.remote_peer, proto):
            await stream.reset()
            return
        try:
            await handler(stream)
        except TransportError as exc:
            log.debug("handler %s with %s ended: %s", proto, conn.remote_peer, exc)
            if isinstance(exc, ProtocolError):  # a wire violation, not a lost connection
                self.penalize(conn.remote_peer, f"{proto}: {exc}")
            await stream.reset()
        except Exception:
            log.exception("handler for %s crashed (peer %s)", proto, conn.remote_peer)
            await stream.reset()
        else:
            await stream.close()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for listener in self._listeners:
            await trio.aclose_forcefully(listener)
        with trio.move_on_after(1.0) as scope:
            scope.shield = True
            for conn in self.connections():
                await conn.close()


@dataclass
class _Race:
    """Attempts of one :meth:`Host._connect_addrs` (they run in the host's nursery)."""

    remaining: int
    won: list[Connection] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    scopes: list[trio.CancelScope] = field(default_factory=list)
    settled: bool = False  # the caller has its connection or gave up: attempts not started are dropped
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class _PeerDial:
    """What one :meth:`Host.connect_peer` tried, for a one-line error."""

    peer: PeerId
    known: list[Multiaddr]
    timeout: float
    route: bool
    won: Connection | None = None
    errors: list[str] = field(default_factory=list)
    routed: list[Multiaddr] | None = None  # what the router found (None: not asked, or not yet)
    guessed: str = ""  # the router found nothing, and our own relays did not know the peer either
    known_done: trio.Event = field(default_factory=trio.Event)

    def failure(self, router: bool) -> str:
        """Why no connection was made (``router``: a peer router was there to ask)."""
        peer = self.peer
        if not self.known and not self.routed:
            if self.route and self.routed is None:
                return f"cannot find {peer}: no address for it here, and the DHT lookup did not end in time"
            where = "here or in the DHT" if self.route and router else "here"
            relays = {"no reservation": ", and our relays have no reservation for it",
                      "no answer": ", and our relays could not reach it"}.get(self.guessed, "")  # fmt: skip
            return f"cannot find {peer}: no address for it {where}{relays}"
        if not self.errors:
            return f"cannot reach {peer} within {self.timeout:.1f}s"
        if len(self.errors) == 1:
            return self.errors[0]
        return f"cannot reach {peer}: " + "; ".join(self.errors[:3])


async def _first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return when the first of ``waits`` returns (the others are cancelled)."""
    async with trio.open_nursery() as nursery:

        async def one(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(one, wait)


async def _close_quietly(conn: Connection) -> None:
    try:
        await conn.close()
    except Exception:
        pass


def _proto_name(protocol: str | None) -> str:
    return protocol if protocol is not None else "negotiation"


def _recount(session: yamux.YamuxSession, protocol: str | None, n: int) -> None:
    """Bytes buffered when the negotiation ends (counted on arrival, protocol unknown then) belong
    to the protocol just negotiated (metrics)."""
    if n:
        session.traffic_in[None] -= n
        session.traffic_in[protocol] += n


_TRANSIENT_ACCEPT_ERRNOS = {
    getattr(errno, name)
    for name in ("ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
                 "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "EPERM")
    if hasattr(errno, name)
}  # fmt: skip
_LINGER_RESET = struct.pack("ii", 1, 0)


def _refuse(sock: trio.socket.SocketType) -> None:
    """Close an accepted socket with a reset (no FIN handshake, no TIME_WAIT), synchronously."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


async def _open_listener(host: str, port: int) -> trio.SocketListener:
    """A TCP listener whose port outbound hole-punch dials can share (SO_REUSEPORT, set after bind
    so that binding a port another process holds still fails as "address in use")."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind((host, port))
        sock.listen(1024)  # a burst of dials (refused ones too) queues instead of losing SYNs
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


_TCPI_RTT = struct.Struct("=I")  # struct tcp_info's tcpi_rtt (microseconds), at offset 68 on Linux


def tcp_rtt(stream: object) -> float | None:
    """The kernel's smoothed RTT of a TCP connection under ``stream`` in seconds (Linux TCP_INFO);
    None for other streams (relayed) or systems."""
    sock = getattr(stream, "socket", None)
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    if len(info) < 72:
        return None
    (rtt_us,) = _TCPI_RTT.unpack_from(info, 68)
    return rtt_us / 1e6 if rtt_us else None


_TCPI_UNACKED = 24  # offsets in struct tcp_info (Linux): segments in flight, ms since the last ACK
_TCPI_LAST_ACK_RECV = 56


def tcp_stalled(stream: object, seconds: float) -> bool | None:
    """Has the TCP connection under ``stream`` had data in flight without an ACK for ``seconds``?
    That is a dead path, not a slow peer: a live peer's kernel acknowledges even while its process
    is starved. A relayed stream answers for the connection to its relay (its ``carrier()``). None
    when unknown (not TCP, not Linux)."""
    for _ in range(3):  # a circuit's carrier, at most a few levels down
        carrier = getattr(stream, "carrier", None)
        if not callable(carrier):
            break
        stream = carrier()
    sock = getattr(stream, "socket", None)
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return None
    if len(info) < _TCPI_LAST_ACK_RECV + 4:
        return None
    (unacked,) = _TCPI_RTT.unpack_from(info, _TCPI_UNACKED)
    (last_ack_ms,) = _TCPI_RTT.unpack_from(info, _TCPI_LAST_ACK_RECV)
    return unacked > 0 and last_ack_ms >= seconds * 1000


async def open_from_port(local: tuple[str, int], remote: tuple[str, int]) -> trio.SocketStream:
    """A TCP connection from a fixed local port (our listen port): what a hole punch needs, since a
    NAT maps that port to the public one peers were told about. Raises OSError."""
    family = socket.AF_INET6 if ":" in remote[0] else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind(local)
        await sock.connect(remote)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


MUXERS = (yamux.PROTOCOL_ID,)  # offered in the Noise handshake (inlined muxer negotiation)


async def upgrade(
    stream: trio.abc.Stream,
    keypair: KeyPair,
    outbound: bool,
    expected: PeerId | None = None,
    muxers: Sequence[str] = MUXERS,
    ciphers: Sequence[str] = noise.TRANSPORT_CIPHERS,
) -> tuple[noise.SecureStream, bytes]:
    """multistream-select Noise, handshake, Yamux: the libp2p connection upgrade.

    The dialer proposes ``/noise`` lazily: the proposal and the handshake's first message go out in
    one write (one round trip saved; a listener that refuses Noise ends the connection either way).
    Both sides list their muxers in the handshake; when both did, Yamux needs no multistream round
    trip (spec: inlined muxer negotiation), else it is negotiated on the secured channel as before.
    ``muxers``: what we list (Yamux; none behaves as a peer without the optimisation); ``ciphers``:
    the transport ciphers we offer beyond ChaChaPoly (AES-GCM when both sides offer it). Returns the
    secured stream and the decrypted bytes read past the negotiation (they belong to the muxer).
    The caller bounds the time."""
    raw_buf = bytearray()
    if outbound:
        hs, first = noise.start_outbound(keypair, muxers, ciphers)
        await stream.send_all(multistream.proposal(noise.PROTOCOL_ID) + first)
        await multistream.expect_accepted(stream, noise.PROTOCOL_ID, raw_buf)
        secure = await noise.finish_outbound(stream, hs, expected, raw_buf)
    else:
        await multistream.select_inbound(stream, lambda p: p == noise.PROTOCOL_ID, raw_buf, header_first=True)
        secure = await noise.secure_inbound(stream, keypair, raw_buf, muxers, ciphers)
    if secure.muxer is not None:
        return secure, b""
    reader = _SecureReader(secure)
    if outbound:
        await multistream.select_outbound(reader, [yamux.PROTOCOL_ID], reader.buf)
    else:
        await multistream.select_inbound(
            reader, lambda p: p == yamux.PROTOCOL_ID, reader.buf, header_first=True
        )
    return secure, bytes(reader.buf)


class _SecureReader:
    """Adapts a SecureStream to multistream's reader: bytes already decrypted come first."""

    def __init__(self, secure: noise.SecureStream) -> None:
        self.secure = secure
        self.buf = bytearray()  # decrypted bytes read past the negotiation go to the muxer

    async def send_all(self, data: bytes) -> None:
        await self.secure.send_all(data)

    async def receive_some(self, max_bytes: int = 65536) -> bytes | bytearray:
        data = await self.secure.receive_some()
        if not data:
            raise ConnectionLost("connection closed during negotiation")
        return data
