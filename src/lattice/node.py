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

import functools
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from lattice._version import __version__
from lattice.config import NodeConfig
from lattice.errors import LatticeError, NodeError
from lattice.identity import KeyPair, PeerId, load_or_create_key
from lattice.multiaddr import Multiaddr, dialable
from lattice.nat.manager import NATConfig, NATManager
from lattice.nat.relay import RelayLimits
from lattice.transport import dnsaddr
from lattice.transport import ping as ping_protocol
from lattice.transport.connmgr import ConnectionManager
from lattice.transport.host import Connection, Host, HostConfig
from lattice.transport.sink import drain
from lattice.transport.stack import open_host

__all__ = ["BlockingNode", "Node", "Service"]

log = logging.getLogger(__name__)


class Service(Protocol):
    """A plug-in service (DHT, CRDT, RPC, apps): started with the node, stopped with it."""

    name: str

    async def run(self, node: Node, task_status: trio.TaskStatus = ...) -> None:
        """Run until cancelled; call ``task_status.started()`` once usable."""


RELAY_KEY = "/lattice/relays"  # DHT provider key under which relays announce themselves


def _conn_row(conn: Connection) -> dict:
    return {
        "addr": str(conn.remote_addr),
        "direction": conn.direction,
        "relayed": conn.relayed,
        "streams": conn.session.num_streams,
        "age_s": round(time.time() - conn.opened_at, 1),
    }


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
        swarm: Any = None,  # a lattice.swarm.profiles.SwarmProfile (default: from config.swarm)
    ) -> None:
        from lattice.swarm import roles

        self.config = roles.apply(config or NodeConfig())
        self._keypair = keypair
        self.host: Host | None = None
        self.services: dict[str, Service] = {}
        for service in services if services is not None else default_services():
            self.services[service.name] = service
        self.control_ops: dict[str, Callable[..., Any]] = {}
        self.control_path = self.config.control_path
        self._stack: Any = None
        self._nursery: trio.Nursery | None = None
        self._shutdown = trio.Event()
        self._started_at = 0.0
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
            dial_timeout=cfg.dial_timeout,
            stream_window=cfg.stream_window,
            stream_window_max=cfg.stream_window_max,
        )
        self._stack = AsyncExitStack()
        await self._stack.__aenter__()
        try:
            self.host = await self._stack.enter_async_context(open_host(keypair, host_config))
            from lattice.transport.limits import PeerLimits

            self.host.limits = PeerLimits(profile.limits)  # per-IP caps, rate limits, bans
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
            self._install_swarm_guard()
            for proto in profile.sink_protocols:
                self.host.set_stream_handler(proto, drain)
            for service in self.services.values():  # handlers exist before any peer can identify us
                await self._nursery.start(service.run, self)
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
        self._started_at = time.time()
        return self

    def _resolve_swarm(self) -> Any:
        """The swarm profile; the DHT takes its protocol id unless one was configured explicitly."""
        from lattice.dht.service import PROTOCOL_ID as DEFAULT_KAD
        from lattice.swarm.profiles import resolve

        if self.swarm is None:
            self.swarm = resolve(self.config.swarm, self.config.swarm_file)
        dht = self.services.get("dht")
        dht_config = getattr(dht, "config", None)
        if dht_config is not None and dht_config.protocol_id == DEFAULT_KAD:
            dht_config.protocol_id = self.swarm.kad_protocol
        return self.swarm

    def _install_swarm_guard(self) -> None:
        from lattice.swarm.guard import SwarmGuard

        self.swarm_guard = SwarmGuard(self, self.swarm)
        self.swarm_guard.install()
        dht = self.services.get("dht")
        if dht is not None and hasattr(dht, "admit"):
            dht.admit = self.swarm_guard.admit

    def _wire_relay_discovery(self) -> None:
        """Relays announce themselves as providers of RELAY_KEY in the DHT; NATed nodes look there
        when their bootstrap peers and configured relays are not enough. Anyone can announce, so
        every provider the DHT lists is fetched (64 per key at most) and each is only a candidate:
        autorelay uses it once the peer at its address grants a reservation."""
        assert self.nat is not None and self._nursery is not None
        dht = self.services["dht"]

        async def discover() -> list[Multiaddr]:
            out = []
            for peer, addrs in await dht.find_providers(RELAY_KEY, count=64):
                direct = [a for a in dialable([Multiaddr.parse(a) for a in addrs]) if a.tcp_target()]
                if direct:  # the best one (public before private before loopback)
                    out.append(direct[0].with_peer(PeerId.from_string(peer)))
            return out

        self.nat.autorelay.discover = discover
        if self.config.relay:

            async def announce() -> None:
                while True:  # first as soon as the DHT knows somebody and we are reachable, then hourly
                    if not self.nat.relay_announceable:  # not (yet) known public, or serving no more
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

    def add_service(self, service: Service) -> None:
        """Register a service before the node starts (it starts with the node)."""
        if self.host is not None:
            raise NodeError("add services before the node starts")
        if service.name in self.services:
            raise NodeError(f"service {service.name!r} is already registered")
        self.services[service.name] = service

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
    def rpc(self):  # -> lattice.rpc.RPC
        """The tensor RPC service (``node.rpc.call(peer, "svc.method", payload)``)."""
        try:
            return self.services["rpc"]
        except KeyError:
            raise NodeError("this node runs without the RPC service") from None

    @property
    def dht(self):  # -> lattice.dht.DHT
        """The Kademlia DHT (``node.dht.put(key, value)``, ``get``, ``provide``, ``find_providers``)."""
        try:
            return self.services["dht"]
        except KeyError:
            raise NodeError("this node runs without the DHT service") from None

    @property
    def pubsub(self):  # -> lattice.pubsub.PubSub
        """Publish/subscribe over a gossipsub mesh (``node.pubsub.publish("topic", b"...")``)."""
        try:
            return self.services["pubsub"]
        except KeyError:
            raise NodeError("this node runs without the pubsub service") from None

    @property
    def crdt(self):  # -> lattice.crdt.service.CRDT
        """Replicated documents (``node.crdt.open("swarm/config").get_map("root")["lr"] = 0.1``)."""
        try:
            return self.services["crdt"]
        except KeyError:
            raise NodeError("this node runs without the CRDT service") from None

    @property
    def content(self):  # -> lattice.content.Content
        """Content-addressed blobs and checkpoints (``cid = await node.content.add(path)``, ``get``)."""
        try:
            return self.services["content"]
        except KeyError:
            raise NodeError("this node runs without the content service") from None

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
        """Connected peers with their connection details."""
        host = self._require_host()
        punches = self.nat.puncher.results if self.nat and self.nat.puncher else {}
        out = []
        for peer in host.connected_peers():
            conn = host.connection_to(peer)
            info = host.peerstore.get(peer)
            if conn is None:
                continue
            out.append(
                {
                    "peer_id": str(peer),
                    "addr": str(conn.remote_addr),
                    "direction": conn.direction,
                    "relayed": conn.relayed,
                    "hole_punch": punches.get(peer),
                    "rtt_ms": round(conn.rtt * 1000, 3) if conn.rtt is not None else None,
                    "agent": info.agent_version if info else "",
                    "listen_addrs": [str(a) for a in info.addrs] if info else [],
                    "protocols": info.protocols if info else [],
                    "streams": conn.session.num_streams,
                    "connections": [_conn_row(c) for c in host._conns.get(peer, ()) if not c.closed],
                    "connected_for_s": round(time.time() - conn.opened_at, 1),
                }
            )
        return out

    async def status(self) -> dict:
        host = self._require_host()
        cfg = self.config
        conns = host.connections()
        direct = {c.remote_peer for c in conns if not c.relayed}
        boot = self.connmgr.bootstrap_peers if self.connmgr else {}
        return {
            "peer_id": str(host.peer_id),
            "version": __version__,
            "addrs": self.addrs,
            "listen": [str(a) for a in host.listen_addrs],
            "uptime_s": round(time.time() - self._started_at, 1),
            "peers": len(host.connected_peers()),
            "connections": len(conns),
            "reachability": self.nat.reachability if self.nat else "unknown",
            "nat": self.nat.status() if self.nat else None,
            "paths": {str(p): "direct" if p in direct else "relayed" for p in {c.remote_peer for c in conns}},
            "direct_peers": len(direct),
            "relayed_peers": len({c.remote_peer for c in conns if c.relayed} - direct),
            "observed_addrs": [str(a) for a, _ in host.observed_addrs.most_common(4)],
            "peerstore": host.peerstore.status(),
            "bootstrap": [
                {
                    "addr": str(a),
                    "peer_id": str(p) if p else None,
                    "connected": bool(p and host.connection_to(p)),
                }
                for a, p in boot.items()
            ],
            "bytes_sent": sum(c.session.bytes_sent for c in conns),
            "bytes_received": sum(c.session.bytes_received for c in conns),
            "services": sorted(self.services),
            "resources": host.resource_stats(),
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
            host._enforce_ban(target)

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


def default_services() -> list[Service]:
    """The services every node runs unless told otherwise.

    node.py is the composition root: this is the one place where the node layer names the services
    above it (imported here, lazily, so the layers stay one-way everywhere else).
    """
    from lattice.content.service import Content
    from lattice.crdt.service import CRDT
    from lattice.dht.service import DHT
    from lattice.pubsub import PubSub
    from lattice.rpc import RPC

    return [RPC(), DHT(), PubSub(), CRDT(), Content()]


def _as_peer(peer: str | PeerId) -> PeerId:
    return peer if isinstance(peer, PeerId) else PeerId.from_string(str(peer))


class BlockingNode:
    """The same node and method names, blocking: for training scripts and notebooks."""

    def __init__(self, node: Node, start_timeout: float = 30.0) -> None:
        self.node = node
        self._token: trio.lowlevel.TrioToken | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="lattice-node", daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout):
            raise NodeError(f"node did not start within {start_timeout:.0f}s")
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        async def run() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            try:
                async with self.node:
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as exc:  # surfaced to the caller of start()
                self._error = exc
                self._ready.set()

        trio.run(run)

    def _call(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        if self._token is None or not self._thread.is_alive():
            raise NodeError("the node is closed")
        return trio.from_thread.run(functools.partial(fn, *args, **kwargs), trio_token=self._token)

    @property
    def peer_id(self) -> PeerId:
        return self.node.peer_id

    @property
    def dht(self) -> BlockingService:
        """The DHT, blocking (same method names as ``Node.dht``)."""
        return BlockingService(self, self.node.dht, ("put", "get", "provide", "find_providers"))

    @property
    def crdt(self):  # -> lattice.crdt.blocking.BlockingCRDT
        """Replicated documents, blocking (``node.crdt.open("swarm/config").get_map("root")["lr"] = 0.1``;
        reads and writes run on the node's loop, values come back as plain Python)."""
        from lattice.crdt.blocking import BlockingCRDT  # lazily: the node layer stays below services

        return BlockingCRDT(self, self.node.crdt)

    @property
    def rpc(self) -> BlockingRPC:
        """The RPC service, blocking (same method names as ``Node.rpc``)."""
        return BlockingRPC(self, self.node.rpc)

    @property
    def addrs(self) -> list[str]:
        return self._call(_sync_to_async(lambda: self.node.addrs))

    def run(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """Run any coroutine function on the node's trio loop (for services' async APIs)."""
        return self._call(fn, *args, **kwargs)

    def id(self) -> dict:
        return self._call(self.node.id)

    def connect(self, addr: str, timeout: float | None = None) -> str:
        return self._call(self.node.connect, addr, timeout)

    def disconnect(self, peer: str | PeerId) -> None:
        return self._call(self.node.disconnect, peer)

    def ping(self, target: str | PeerId, count: int = 1, timeout: float | None = None) -> list[float]:
        return self._call(self.node.ping, target, count, timeout)

    def peers(self) -> list[dict]:
        return self._call(self.node.peers)

    def status(self) -> dict:
        return self._call(self.node.status)

    def close(self) -> None:
        """Stop the node and its thread (idempotent)."""
        if self._token is not None and self._thread.is_alive() and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout=10)

    def __enter__(self) -> BlockingNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sync_to_async(fn: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    async def wrapper() -> Any:
        return fn()

    return wrapper


class BlockingRPC:
    """``node.rpc`` for blocking code: calls block; plain (sync) handlers run in worker threads."""

    def __init__(self, owner: BlockingNode, rpc: Any) -> None:
        self._owner = owner
        self._rpc = rpc

    def register(self, name: str, fn: Callable[..., Any], **kwargs: Any) -> None:
        self._rpc.register(name, fn, **kwargs)

    def method(self, name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return self._rpc.method(name, **kwargs)

    @property
    def methods(self) -> list[str]:
        return self._rpc.methods

    def call(self, peer: Any, method: str, payload: Any = None, **kwargs: Any) -> Any:
        return self._owner._call(self._rpc.call, peer, method, payload, **kwargs)

    def call_client_stream(self, peer: Any, method: str, values: Any, **kwargs: Any) -> Any:
        return self._owner._call(self._rpc.call_client_stream, peer, method, list(values), **kwargs)

    def call_stream(self, peer: Any, method: str, payload: Any = None, **kwargs: Any) -> list[Any]:
        """All values of a server-streaming call (use the async API to consume them one by one)."""

        async def collect() -> list[Any]:
            async with self._rpc.call_stream(peer, method, payload, **kwargs) as items:
                return [item async for item in items]

        return self._owner._call(collect)


class BlockingService:
    """A service's async methods as blocking calls on the node's loop (same names)."""

    def __init__(self, owner: BlockingNode, service: Any, names: tuple[str, ...]) -> None:
        self._owner = owner
        self._service = service
        self._names = names

    def __getattr__(self, name: str) -> Any:
        if name not in self._names:
            raise AttributeError(name)
        method = getattr(self._service, name)
        return lambda *args, **kwargs: self._owner._call(method, *args, **kwargs)
