"""The node: composes the host, connection manager, services and the local control API.

Async (trio)::

    async with Node(NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], control=False)) as node:
        await node.connect("/ip4/127.0.0.1/tcp/4001/p2p/12D3KooW...")
        print(await node.peers())

Blocking, for ordinary scripts (the trio loop runs in a background thread; same method names)::

    node = Node.start(NodeConfig(control=False))
    node.connect(addr); node.peers(); node.close()
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

from lattice._version import __version__
from lattice.blocking import BlockingNode
from lattice.config import NodeConfig, parse_size
from lattice.errors import LatticeError, NodeError
from lattice.identity import KeyPair, PeerId, load_or_create_key
from lattice.multiaddr import Multiaddr, dialable
from lattice.nat.manager import NATConfig, NATManager
from lattice.nat.relay import RelayLimits
from lattice.service import Service, ServiceContext
from lattice.transport import dnsaddr
from lattice.transport import ping as ping_protocol
from lattice.transport.connmgr import ConnectionManager
from lattice.transport.host import Host, HostConfig
from lattice.transport.sink import drain
from lattice.transport.stack import open_host

if TYPE_CHECKING:  # the services' types, for IDEs and the type checker (imported lazily at run time)
    from lattice.content.service import Content
    from lattice.crdt.service import CRDT
    from lattice.dht.service import DHT
    from lattice.pubsub.service import PubSub
    from lattice.rpc.service import RPC
    from lattice.swarm.profiles import SwarmProfile

_S = TypeVar("_S")

__all__ = ["AppService", "BlockingNode", "Node", "Service", "ServiceContext", "default_services"]

log = logging.getLogger(__name__)


class AppService(Protocol):
    """An application's service (``node.add_service``): built on the node's public API (``node.rpc``,
    ``node.dht``, ``node.dashboard``, ...), started after the node's own services, stopped with it."""

    name: str

    async def run(self, node: Node, task_status: trio.TaskStatus = ...) -> None:
        """Run until cancelled; call ``task_status.started()`` once usable."""


RELAY_KEY = "/lattice/relays"  # DHT provider key under which relays announce themselves


def _nat_config(cfg: NodeConfig) -> NATConfig:
    limits = RelayLimits(
        max_reservations=cfg.relay_max_reservations,
        max_circuits=cfg.relay_max_circuits,
        circuit_duration=cfg.relay_circuit_duration,
        circuit_bytes=cfg.relay_circuit_bytes,
    )
    return NATConfig(
        reachability=cfg.reachability,
        relay_service=cfg.relay,
        relay_limits=limits,
        relays=[Multiaddr.parse(a) for a in cfg.relays],
        hole_punching=cfg.hole_punching,
        autonat_confirmations=cfg.autonat_confirmations,
        upnp=cfg.upnp,
        mdns=cfg.mdns,
    )


class Node:
    def __init__(
        self,
        config: NodeConfig | None = None,
        *,
        keypair: KeyPair | None = None,
        services: list[Service] | None = None,
        apps: list[AppService] | None = None,
        swarm: SwarmProfile | None = None,  # default: the profile config.swarm names
    ) -> None:
        """``services``: the node's own services (run with a ServiceContext); default: RPC, DHT,
        pubsub, CRDT and content, configured from ``config`` (:func:`default_services`).
        ``apps``: applications' services (run with the node, after its own; see add_service)."""
        from lattice.swarm import roles

        self.config = roles.apply(config or NodeConfig())
        self._keypair = keypair
        self.host: Host | None = None
        self.services: dict[str, Service] = {}
        for service in services if services is not None else default_services(self.config):
            self.services[service.name] = service
        self.app_services: dict[str, AppService] = {}
        for app in apps or ():
            self.add_service(app)
        self.control_ops: dict[str, Callable[..., Any]] = {}
        self.control_path = self.config.control_path
        self._stack: Any = None
        self._nursery: trio.Nursery | None = None
        self._shutdown = trio.Event()
        self.started_at = 0.0  # wall-clock time the node started (0: not yet)
        self.connmgr: ConnectionManager | None = None
        self.nat: NATManager | None = None
        self.swarm = swarm  # the SwarmProfile, resolved at start if not given
        self.swarm_guard: Any = None
        self.fatal_error: str | None = None  # why the node stopped itself (e.g. wrong swarm)
        from lattice.observe.dashboard import Dashboard

        self.dashboard = Dashboard()  # panels apps push series to; drawn by the web page
        self.http_url: str | None = None  # the metrics / web page server, when metrics_listen is set
        self._register_core_ops()

    # -- lifecycle
    async def __aenter__(self) -> Node:
        from contextlib import AsyncExitStack

        from lattice._files import private_dir

        cfg = self.config
        private_dir(cfg.data_dir, "data dir")  # before any file goes in: others must not write it
        keypair = self._keypair or load_or_create_key(cfg.key_path)
        profile = self._resolve_swarm()
        host_config = HostConfig(
            agent_version=f"lattice/{__version__}",
            protocol_version=profile.identify_version,
            resources=cfg.resource_limits,
            peer_limits=profile.limits,  # per-IP caps, rate limits, bans
            dial_timeout=cfg.dial_timeout,
            stream_window=cfg.stream_window,
            stream_window_max=cfg.stream_window_max,
            noise_ciphers=cfg.noise_ciphers,
            read_lowat_max=cfg.read_lowat_max,
        )
        self._stack = AsyncExitStack()
        await self._stack.__aenter__()
        try:
            self.host = await self._stack.enter_async_context(open_host(keypair, host_config))
            self._nursery = await self._stack.enter_async_context(trio.open_nursery())
            self._stack.callback(self._nursery.cancel_scope.cancel)  # runs before the nursery exits
            for addr in cfg.listen:  # bind now (a busy port fails fast), accept once services are up
                await self.host.listen(addr, accept=False)
            self.nat = NATManager(self.host, _nat_config(cfg))
            self.nat.install()
            await self._nursery.start(self.nat.run)
            control = None
            if self.control_path is not None:
                from lattice.control.server import ControlServer

                control = ControlServer(self.control_path)
                await control.bind()
            self._install_swarm_guard(profile)
            for proto in profile.sink_protocols:
                self.host.set_stream_handler(proto, drain)
            ctx = ServiceContext(
                host=self.host,
                data_dir=cfg.data_dir,
                add_control_op=self.add_control_op,
                services=MappingProxyType(self.services),
                admit=self.swarm_guard.admit,
                protocol_ids=MappingProxyType({"kad": profile.kad_protocol}),
                keep_connected=self._keep_connected,
            )
            for service in self.services.values():  # handlers exist before any peer can identify us
                await self._nursery.start(service.run, ctx)
            for app in self.app_services.values():  # apps build on the services just started
                await self._nursery.start(app.run, self)
            self.host.start_accepting()
            if "dht" in self.services:
                self._wire_relay_discovery()
            boot_addrs = [Multiaddr.parse(a) for a in dict.fromkeys([*cfg.bootstrap, *profile.bootstrap])]
            if any(a.parts[0][0] == "dnsaddr" for a in boot_addrs):  # the swarm's list, published in DNS
                named = ", ".join(str(a) for a in boot_addrs)
                boot_addrs = await dnsaddr.resolve_all(boot_addrs, dnsaddr.dns_lookup(cfg.dns_servers))
                if not boot_addrs and not cfg.bootstrap_node:
                    raise dnsaddr.DnsaddrError(f"no bootstrap address: {named} did not resolve (see the log)")
            bootstrap = [a for a in boot_addrs if a.peer_id != keypair.peer_id]
            self.connmgr = ConnectionManager(self.host, bootstrap, keepalive_interval=cfg.keepalive_interval)
            self._nursery.start_soon(self.connmgr.run)
            if cfg.metrics_listen:
                from lattice.observe.http import serve_http

                self.http_url = await self._nursery.start(serve_http, self, cfg.metrics_listen)
            if control is not None:
                control.ops = self.control_ops
                self._nursery.start_soon(control.serve)
        except BaseException:
            await self._stack.__aexit__(None, None, None)
            raise
        self.started_at = time.time()
        return self

    def _keep_connected(self, peer: PeerId) -> None:
        if self.connmgr is not None:
            self.connmgr.keep(peer)

    def _resolve_swarm(self) -> SwarmProfile:
        """The swarm profile (its protocol ids reach the services through their context)."""
        from lattice.swarm.profiles import resolve

        if self.swarm is None:
            self.swarm = resolve(self.config.swarm, self.config.swarm_file)
        return self.swarm

    def _install_swarm_guard(self, profile: SwarmProfile) -> None:
        from lattice.swarm.guard import SwarmGuard

        self.swarm_guard = SwarmGuard(self, profile)
        self.swarm_guard.install()

    def _wire_relay_discovery(self) -> None:
        """Relays announce themselves as providers of RELAY_KEY in the DHT; NATed nodes look there
        when their bootstrap peers and configured relays are not enough. Anyone can announce, so
        every provider the DHT lists is fetched (64 per key at most) and each is only a candidate:
        autorelay uses it once the peer at its address grants a reservation."""
        assert self.nat is not None and self._nursery is not None
        nat = self.nat
        dht = self.dht

        async def discover() -> list[Multiaddr]:
            out = []
            for peer, addrs in await dht.find_providers(RELAY_KEY, count=64):
                direct = [a for a in dialable([Multiaddr.parse(a) for a in addrs]) if a.tcp_target()]
                if direct:  # the best one (public before private before loopback)
                    out.append(direct[0].with_peer(PeerId.from_string(peer)))
            return out

        nat.use_relay_discovery(discover)
        if self.config.relay:

            async def announce() -> None:
                while True:  # first as soon as the DHT knows somebody and we are reachable, then hourly
                    if not nat.relay_announceable:  # not (yet) known public, or serving no more
                        await trio.sleep(2)
                        continue
                    try:
                        stored = await dht.provide(RELAY_KEY)
                    except (LatticeError, trio.TooSlowError) as exc:
                        log.debug("relay announcement failed: %s", exc)
                        stored = 0
                    await trio.sleep(3600 if stored > 1 else 5)

            self._nursery.start_soon(announce)

    async def __aexit__(self, *exc_info: Any) -> bool:
        stack, self._stack = self._stack, None
        if stack is None:
            return False
        return bool(await stack.__aexit__(*exc_info))

    async def aclose(self) -> None:
        await self.__aexit__(None, None, None)

    def add_service(self, service: AppService) -> None:
        """Register an application's service before the node starts: it starts with the node,
        after the node's own services, and gets the node itself (its public API)."""
        if self.host is not None:
            raise NodeError("add services before the node starts")
        if service.name in self.services or service.name in self.app_services:
            raise NodeError(f"service {service.name!r} is already registered")
        self.app_services[service.name] = service

    def add_control_op(self, name: str, op: Callable[..., Any]) -> None:
        """Expose an operation on the daemon's control API (and so to ``lattice.Client``)."""
        if name in self.control_ops:
            raise NodeError(f"control operation {name!r} is already registered")
        self.control_ops[name] = op

    def request_shutdown(self) -> None:
        self._shutdown.set()

    async def wait_shutdown(self) -> None:
        await self._shutdown.wait()

    async def serve_until_stopped(self) -> None:
        """Serve until SIGINT/SIGTERM or a shutdown request (``lattice-node stop``): the main loop
        of the daemon and of app servers. Signal handling needs the main thread."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    async for _ in signals:
                        break
                    nursery.cancel_scope.cancel()

                async def on_shutdown() -> None:
                    await self.wait_shutdown()
                    await trio.sleep(0.05)  # let the control reply go out
                    nursery.cancel_scope.cancel()

                nursery.start_soon(on_signal)
                nursery.start_soon(on_shutdown)

    @property
    def rpc(self) -> RPC:
        """The tensor RPC service (``node.rpc.call(peer, "svc.method", payload)``)."""
        from lattice.rpc.service import RPC

        return self._service("rpc", RPC, "RPC")

    @property
    def dht(self) -> DHT:
        """The Kademlia DHT (``node.dht.put(key, value)``, ``get``, ``provide``, ``find_providers``)."""
        from lattice.dht.service import DHT

        return self._service("dht", DHT, "DHT")

    @property
    def pubsub(self) -> PubSub:
        """Publish/subscribe over a gossipsub mesh (``node.pubsub.publish("topic", b"...")``)."""
        from lattice.pubsub.service import PubSub

        return self._service("pubsub", PubSub, "pubsub")

    @property
    def crdt(self) -> CRDT:
        """Replicated documents (``node.crdt.open("swarm/config").get_map("root")["lr"] = 0.1``)."""
        from lattice.crdt.service import CRDT

        return self._service("crdt", CRDT, "CRDT")

    @property
    def content(self) -> Content:
        """Content-addressed blobs and checkpoints (``cid = await node.content.add(path)``, ``get``)."""
        from lattice.content.service import Content

        return self._service("content", Content, "content")

    def _service(self, name: str, kind: type[_S], what: str) -> _S:
        found = self.services.get(name)
        if not isinstance(found, kind):
            raise NodeError(f"this node runs without the {what} service")
        return found

    # -- identity and addresses
    def _require_host(self) -> Host:
        if self.host is None:
            raise NodeError("the node is not running (use `async with Node(...)` or Node.start())")
        return self.host

    @property
    def peer_id(self) -> PeerId:
        return self._require_host().peer_id

    @property
    def addrs(self) -> list[str]:
        """Full multiaddrs other peers can dial (``.../p2p/<peer id>``)."""
        host = self._require_host()
        return [str(a.with_peer(host.peer_id)) for a in host.advertised_addrs()]

    # -- operations (each is also a control op and a BlockingNode method)
    async def id(self) -> dict:
        host = self._require_host()
        return {"peer_id": str(host.peer_id), "addrs": self.addrs, "agent": host.config.agent_version}

    async def connect(self, addr: str | PeerId, timeout: float | None = None) -> str:
        """Connect to a peer by multiaddr, or by peer id (addresses found through the DHT, reached
        directly or through its relay; an existing connection must answer a ping); returns its
        peer id."""
        host = self._require_host()
        timeout = timeout or self.config.dial_timeout
        if isinstance(addr, str) and addr.startswith("/"):
            conn = await host.connect(addr, timeout=timeout)
        else:
            conn = await host.connect_peer(_as_peer(addr), timeout=timeout, verify=True)
        return str(conn.remote_peer)

    async def disconnect(self, peer: str | PeerId) -> None:
        await self._require_host().disconnect(_as_peer(peer))

    async def ping(self, target: str | PeerId, count: int = 1, timeout: float | None = None) -> list[float]:
        """Ping a peer by multiaddr or by peer id (dialed as :meth:`connect` does); RTTs in seconds."""
        host = self._require_host()
        timeout = timeout or 10.0
        if isinstance(target, str) and target.startswith("/"):
            peer = _as_peer(await self.connect(target, timeout=timeout))
        else:
            peer = (await host.connect_peer(_as_peer(target), timeout=timeout)).remote_peer
        return await ping_protocol.ping(host, peer, count=count, timeout=timeout)

    async def peers(self) -> list[dict]:
        """Connected peers with their connection details (Host.peer_stats) and hole punches."""
        host = self._require_host()
        punches = self.nat.puncher.results if self.nat and self.nat.puncher else {}
        rows = ((peer, host.peer_stats(peer)) for peer in host.connected_peers())
        return [{**row, "hole_punch": punches.get(peer)} for peer, row in rows if row is not None]

    @property
    def uptime(self) -> float:
        """Seconds since the node started (0 before)."""
        return time.time() - self.started_at if self.started_at else 0.0

    async def status(self) -> dict:
        """The node at a glance: the host's stats (Host.stats), NAT, bootstrap peers, services."""
        host = self._require_host()
        cfg = self.config
        h = host.stats()
        boot = self.connmgr.bootstrap_peers if self.connmgr else {}
        return {
            "peer_id": str(host.peer_id),
            "version": __version__,
            "addrs": self.addrs,
            "listen": [str(a) for a in host.listen_addrs],
            "uptime_s": round(self.uptime, 1),
            "peers": h["peers"],
            "connections": h["connections"],
            "reachability": self.nat.reachability if self.nat else "unknown",
            "nat": self.nat.status() if self.nat else None,
            "paths": h["paths"],
            "direct_peers": h["direct_peers"],
            "relayed_peers": h["relayed_peers"],
            "observed_addrs": h["observed_addrs"],
            "peerstore": h["peerstore"],
            "bootstrap": [
                {
                    "addr": str(a),
                    "peer_id": str(p) if p else None,
                    "connected": bool(p and host.connection_to(p)),
                }
                for a, p in boot.items()
            ],
            "bytes_sent": h["bytes_out"],
            "bytes_received": h["bytes_in"],
            "services": sorted([*self.services, *self.app_services]),
            "resources": h["resources"],
            "control": str(self.control_path) if self.control_path else None,
            "swarm": self.swarm.swarm_id if self.swarm else None,
            "roles": [r for r, on in (("bootstrap", cfg.bootstrap_node), ("relay", cfg.relay)) if on],
        }

    async def shutdown(self) -> None:
        """Stop the daemon (control op): the reply goes out first, then the node stops."""
        self.request_shutdown()

    async def metrics(self) -> dict:
        """Counters and per-peer state (lattice.observe.metrics.snapshot): `top`, the web page."""
        from lattice.observe.metrics import snapshot

        self._require_host()
        return snapshot(self)

    async def bans(self) -> dict:
        """Bans, throttling and refused connections (lattice.transport.limits)."""
        host = self._require_host()
        return host.limits.status() if host.limits else {}

    async def ban(self, peer: str, seconds: float | None = None, reason: str = "by the operator") -> None:
        """Ban a peer id (and the IP it came from) now; its connections are closed."""
        host = self._require_host()
        if host.limits is not None:
            target = _as_peer(peer)
            host.limits.ban(target, reason, seconds)
            host.enforce_ban(target)

    async def unban(self, target: str) -> bool:
        """Lift the ban of a peer id or an IP address."""
        host = self._require_host()
        return bool(host.limits and host.limits.unban(target))

    def _register_core_ops(self) -> None:
        for name in ("id", "connect", "disconnect", "ping", "peers", "status", "shutdown", "metrics"):
            self.control_ops[name] = getattr(self, name)
        for name in ("bans", "ban", "unban"):
            self.control_ops[f"limits.{name}"] = getattr(self, name)

    # -- blocking facade
    @classmethod
    def start(cls, config: NodeConfig | None = None, *, keypair: KeyPair | None = None) -> BlockingNode:
        """Start a node on a background thread and return its blocking facade."""
        return BlockingNode(cls(config, keypair=keypair))


def default_services(config: NodeConfig | None = None) -> list[Service]:
    """The services every node runs unless told otherwise, configured from ``config``.

    node.py is the composition root: this is the one place where the node layer names the services
    and turns the node's configuration into theirs (imported lazily: a node without them pays
    nothing).
    """
    from lattice.content.service import Content
    from lattice.crdt.service import CRDT
    from lattice.dht.service import DHT, DHTConfig
    from lattice.dht.store import StoreLimits
    from lattice.pubsub import PubSub
    from lattice.rpc import RPC, RPCConfig

    config = config or NodeConfig()
    store = StoreLimits(
        max_bytes=config.dht_max_bytes,
        max_bytes_per_publisher=config.dht_max_bytes_per_publisher,
        max_bytes_per_prefix=config.dht_max_bytes_per_prefix,
    )
    return [
        RPC(
            RPCConfig(
                max_payload=parse_size(config.rpc_max_payload),
                max_inbound_per_peer=config.rpc_max_inbound_per_peer,
                message_idle_timeout=config.rpc_message_idle_timeout,
                upload_peer_bytes=parse_size(config.rpc_upload_peer_bytes),
            )
        ),
        DHT(
            DHTConfig(
                store_limits=store,
                store_quorum=config.dht_store_quorum,
                warm_connections=config.dht_warm_connections,
            )
        ),
        PubSub(),
        CRDT(),
        Content(config.content_config),
    ]


def _as_peer(peer: str | PeerId) -> PeerId:
    return peer if isinstance(peer, PeerId) else PeerId.from_string(str(peer))
