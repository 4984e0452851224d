"""Budgets for everything a stranger can make a node spend: memory, connections, pending handshakes
and streams, reserved *before* they are spent, per peer, per IP prefix, per service and per node.

The idea is go-libp2p's resource manager, kept small. A reservation walks a chain of scopes (node,
then the IP prefix the peer came from, then the peer, plus a service's scope when a service makes
it) and succeeds only if every scope has room; otherwise nothing is taken and the caller gets
:class:`ResourceLimitExceeded` naming the scope that was full. Every reservation is returned on
every exit path (leases are context managers).

Fair share: while the node is below ``fair_share_above`` of its memory, any peer may use up to its
own cap (``peer_memory`` of the node); above it, a peer may grow only up to an equal share of the
node among the peers holding memory, so one stranger cannot take what others wait for.

Admission of new connections is fair too: pending handshakes are capped per IP, per prefix and for
the node; when the node is full, the oldest pending handshake is evicted for a new one (a silent
socket that sent ``/noise`` and stopped loses its slot to a peer that completes in milliseconds),
and under pressure handshakes get a shorter deadline.

Pure bookkeeping: no sockets, no trio; the host, the muxer and the services call it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields

from lattice.errors import ConfigError, TransportError
from lattice.transport.limits import TokenBucket, ip_prefix

__all__ = [
    "HandshakeTicket",
    "Lease",
    "ResourceLimitExceeded",
    "ResourceLimits",
    "ResourceManager",
    "default_max_memory",
]

MiB = 1024 * 1024
MIN_MEMORY = 256 * MiB
# Optional memory (receive windows grown beyond their first size, for speed) may fill this part of
# a scope's budget: a peer whose windows grew on a fast transfer can still send its next message.
OPTIONAL_SHARE = 0.5


class ResourceLimitExceeded(TransportError):
    """A reservation did not fit; ``scope`` names the full budget ("node", "peer", "prefix", ...)."""

    def __init__(self, scope: str, what: str, wanted: int, used: int, limit: int) -> None:
        super().__init__(f"{what} budget of the {scope} exhausted ({used}+{wanted} > {limit})")
        self.scope = scope
        self.what = what


def default_max_memory() -> int:
    """A quarter of the machine's RAM, at least 256 MiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 4 * MIN_MEMORY
    return max(MIN_MEMORY, total // 4)


@dataclass(frozen=True)
class ResourceLimits:
    """What the node as a whole, one IP prefix, one peer and one connection may hold (NodeConfig
    ``max_memory`` and the ``[resources]`` table; docs/operators.md, "Limits and budgets")."""

    max_memory: int = 0  # bytes reservable by peers (windows, messages, staging); 0: default_max_memory()
    peer_memory: float = 0.25  # fraction of max_memory one peer may hold
    prefix_memory: float = 0.5  # fraction one IP prefix (/24 or /48) may hold
    fair_share_above: float = 0.5  # node memory use above which peers are held to an equal share
    max_connections: int = 512
    prefix_connections: int = 64  # (per IP: the swarm profile's max_conns_per_ip)
    peer_connections: int = 8
    max_pending_handshakes: int = 64
    ip_pending_handshakes: int = 4
    prefix_pending_handshakes: int = 16
    handshake_timeout: float = 10.0
    pressured_handshake_timeout: float = 2.0  # deadline of new handshakes while half the slots are taken
    evict_after: float = 0.25  # a pending handshake younger than this is never evicted
    ip_accept_rate: float = 8.0  # new inbound connections per second from one IP (burst: 2x) ...
    prefix_accept_rate: float = 32.0  # ... and from one IP prefix: a reconnect storm is refused cheaply
    # ... and for the node (a handshake costs ~1 ms of CPU): past it in one second, a prefix gets in
    # only below its equal share of that second's admissions (newcomers of a quiet prefix always do)
    node_accept_rate: float = 128.0
    max_streams: int = 16384  # open streams over all connections
    peer_streams: int = 1024  # open streams of one peer over all its connections
    exempt_ips: tuple[str, ...] = ("127.0.0.1", "::1")  # no per-IP / per-prefix caps (local testnets)
    peerstore_peers: int = 10_000  # peers the peer store remembers (connected and DHT-table ones stay)
    peerstore_addrs: int = 16  # addresses remembered per peer (newest kept)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "exempt_ips":
                if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                    raise ConfigError("resources.exempt_ips must be a list of IP addresses")
                object.__setattr__(self, f.name, tuple(value))
                continue
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"resources.{f.name} must be a non-negative number")
            if f.name in ("peer_memory", "prefix_memory", "fair_share_above") and not 0 < value <= 1:
                raise ConfigError(f"resources.{f.name} must be a fraction in (0, 1]")
        if self.peerstore_peers < 1 or self.peerstore_addrs < 1:
            raise ConfigError("resources.peerstore_peers and resources.peerstore_addrs must be at least 1")
        if self.max_memory and self.max_memory < 16 * MiB:
            raise ConfigError("resources.max_memory must be at least 16 MiB")

    @property
    def memory(self) -> int:
        return self.max_memory or default_max_memory()


class _Scope:
    """Usage of one holder (the node, a prefix, a peer, a service)."""

    __slots__ = ("conns", "key", "kind", "memory", "name", "peak_memory", "pending", "refused", "streams")

    def __init__(self, kind: str, name: str, key: Hashable = None) -> None:
        self.kind = kind
        self.name = name
        self.key = key if key is not None else name
        self.memory = 0
        self.peak_memory = 0
        self.streams = 0
        self.conns = 0
        self.pending = 0
        self.refused = 0

    def idle(self) -> bool:
        return not (self.memory or self.streams or self.conns or self.pending)

    def row(self) -> dict:
        return {
            "memory": self.memory,
            "peak_memory": self.peak_memory,
            "streams": self.streams,
            "connections": self.conns,
            "pending_handshakes": self.pending,
            "refused": self.refused,
        }


class Lease:
    """Memory held for one owner (a stream's receive window, an inbound message, a staged upload):
    grows and shrinks within the budgets of its scopes; :meth:`close` returns all of it."""

    __slots__ = ("_chain", "_peer", "_rm", "_service", "held")

    def __init__(self, rm: ResourceManager, peer: Hashable | None, service: str | None) -> None:
        self._rm = rm
        self._peer = peer
        self._service = service
        self._chain: tuple[_Scope, ...] = ()
        self.held = 0

    def _scopes(self) -> tuple[_Scope, ...]:
        if not self.held:  # scopes holding nothing may have been dropped since: look them up again
            self._chain = self._rm.chain(self._peer, self._service)
        return self._chain

    def try_grow(self, n: int, optional: bool = False) -> bool:
        """Reserve ``n`` more bytes if they fit. ``optional`` memory (a receive window grown for
        speed) may fill only half of each scope, so what a peer must send still finds room."""
        if self._rm.try_reserve(self._scopes(), n, OPTIONAL_SHARE if optional else 1.0):
            self.held += n
            return True
        return False

    def grow(self, n: int) -> None:
        """Reserve ``n`` more bytes or raise ResourceLimitExceeded (nothing taken)."""
        self._rm.reserve(self._scopes(), n)
        self.held += n

    def shrink(self, n: int) -> None:
        n = min(n, self.held)
        self.held -= n
        self._rm.release(self._chain, n)

    def close(self) -> None:
        if self.held:
            self._rm.release(self._chain, self.held)
            self.held = 0

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class HandshakeTicket:
    """One pending inbound handshake; ``evict`` (set by the host) aborts it."""

    ip: str
    prefix: str  # what it counts against ("" for an exempt address)
    started: float
    timeout: float  # seconds it may take (shorter under pressure)
    evict: Callable[[], None] | None = None
    done: bool = False


class ResourceManager:
    """The node's budgets. ``peer`` keys are opaque hashables (PeerId)."""

    def __init__(self, limits: ResourceLimits | None = None, clock: Callable[[], float] = time.monotonic):
        self.limits = limits or ResourceLimits()
        self.clock = clock
        self.max_memory = self.limits.memory
        self.node = _Scope("node", "node")
        self._prefixes: dict[str, _Scope] = {}
        self._peers: dict[Hashable, _Scope] = {}
        self._peer_prefix: dict[Hashable, str] = {}
        self._services: dict[str, tuple[_Scope, int]] = {}
        self._ip_pending: dict[str, int] = {}
        self._accept_buckets: dict[str, TokenBucket] = {}  # per IP and per prefix (bounded)
        self._second = 0.0  # the node-wide admissions of the current second, per prefix
        self._admitted: dict[str, int] = {}
        self._admitted_total = 0
        self._pending: list[HandshakeTicket] = []  # oldest first
        self.refusals: dict[str, int] = {}  # "scope:what" -> count
        self.evicted_handshakes = 0

    # -- scopes
    def _exempt(self, ip: str | None) -> bool:
        return ip is None or ip.split("%")[0] in self.limits.exempt_ips

    def _prefix(self, ip: str | None) -> _Scope | None:
        if self._exempt(ip):
            return None
        assert ip is not None
        key = ip_prefix(ip)
        scope = self._prefixes.get(key)
        if scope is None:
            scope = self._prefixes[key] = _Scope("prefix", key)
        return scope

    def _peer(self, peer: Hashable) -> _Scope:
        scope = self._peers.get(peer)
        if scope is None:
            scope = self._peers[peer] = _Scope("peer", str(peer), peer)
        return scope

    def chain(self, peer: Hashable | None, service: str | None = None) -> tuple[_Scope, ...]:
        """The scopes a reservation for ``peer`` (and ``service``) is charged to, node first."""
        chain = [self.node]
        if service is not None:
            chain.append(self._service(service))
        if peer is not None:
            prefix = self._peer_prefix.get(peer)
            if prefix is not None and prefix in self._prefixes:
                chain.append(self._prefixes[prefix])
            chain.append(self._peer(peer))
        return tuple(chain)

    def _service(self, name: str) -> _Scope:
        entry = self._services.get(name)
        if entry is None:
            entry = self._services[name] = (_Scope("service", name), self.max_memory)
        return entry[0]

    def set_service_memory(self, name: str, limit: int) -> None:
        """Cap what reservations made for service ``name`` may hold together (default: the node's)."""
        scope = self._service(name)
        self._services[name] = (scope, limit)

    def _forget_if_idle(self, scope: _Scope) -> None:
        if not scope.idle():
            return
        if scope.kind == "peer":
            if self._peers.get(scope.key) is scope:
                del self._peers[scope.key]
                self._peer_prefix.pop(scope.key, None)
        elif scope.kind == "prefix" and self._prefixes.get(scope.name) is scope:
            del self._prefixes[scope.name]

    # -- memory
    def _limit(self, scope: _Scope) -> int:
        lim = self.limits
        if scope.kind == "node":
            return self.max_memory
        if scope.kind == "prefix":
            return int(self.max_memory * lim.prefix_memory)
        if scope.kind == "peer":
            return int(self.max_memory * lim.peer_memory)
        return self._services[scope.name][1]

    def _refuse(self, scope: _Scope, what: str) -> None:
        scope.refused += 1
        key = f"{scope.kind}:{what}"
        self.refusals[key] = self.refusals.get(key, 0) + 1

    def _check(self, chain: tuple[_Scope, ...], n: int, share: float = 1.0) -> tuple[_Scope, int] | None:
        """The first scope ``n`` more bytes do not fit in (and its effective limit), or None;
        ``share`` < 1 checks against that part of each limit."""
        for scope in chain:
            limit = int(self._limit(scope) * share)
            if scope.memory + n > limit:
                return scope, limit
        peer = chain[-1]
        if peer.kind == "peer" and self.node.memory + n > self.max_memory * self.limits.fair_share_above:
            holders = sum(1 for s in self._peers.values() if s.memory) + (0 if peer.memory else 1)
            fair = int(self.max_memory // max(1, holders) * share)
            if peer.memory + n > fair:
                return peer, fair
        return None

    def try_reserve(self, chain: tuple[_Scope, ...], n: int, share: float = 1.0) -> bool:
        if n <= 0:
            return True
        full = self._check(chain, n, share)
        if full is not None:
            if share >= 1.0:  # an optional reservation declined is no refusal
                self._refuse(full[0], "memory")
            return False
        for scope in chain:
            scope.memory += n
            if scope.memory > scope.peak_memory:
                scope.peak_memory = scope.memory
        return True

    def reserve(self, chain: tuple[_Scope, ...], n: int) -> None:
        if n <= 0:
            return
        full = self._check(chain, n)
        if full is not None:
            scope, limit = full
            self._refuse(scope, "memory")
            raise ResourceLimitExceeded(scope.kind, "memory", n, scope.memory, limit)
        for scope in chain:
            scope.memory += n
            if scope.memory > scope.peak_memory:
                scope.peak_memory = scope.memory

    def release(self, chain: tuple[_Scope, ...], n: int) -> None:
        for scope in chain:
            scope.memory -= n
            if scope.memory < 0:  # a bookkeeping bug must not turn into a negative budget
                scope.memory = 0
        for scope in chain[1:]:
            self._forget_if_idle(scope)

    def lease(self, peer: Hashable | None, service: str | None = None) -> Lease:
        """An empty lease charged to ``peer`` (its prefix and the node), and to ``service`` if given."""
        return Lease(self, peer, service)

    # -- handshakes (inbound, before the peer is known)
    def handshake_deadline(self) -> float:
        """Seconds a new handshake may take: shorter once half of the node's slots are taken."""
        lim = self.limits
        if self.node.pending * 2 >= lim.max_pending_handshakes:
            return min(lim.handshake_timeout, lim.pressured_handshake_timeout)
        return lim.handshake_timeout

    def begin_handshake(self, ip: str) -> HandshakeTicket | None:
        """Admit a new inbound socket to the handshake, or None (refused: its IP or prefix holds its
        share). When the node is full, the oldest pending handshake old enough is evicted (its
        ticket's ``evict`` is called) to make room."""
        lim = self.limits
        now = self.clock()
        if not self._exempt(ip):
            if not self._accept_rate_ok(ip, now):
                return None
            if self._ip_pending.get(ip, 0) >= lim.ip_pending_handshakes:
                self._refuse(self.node, "handshakes_per_ip")
                return None
            prefix = self._prefix(ip)
            assert prefix is not None
            if prefix.pending >= lim.prefix_pending_handshakes:
                self._refuse(prefix, "handshakes")
                self._forget_if_idle(prefix)
                return None
        if self.node.pending >= lim.max_pending_handshakes:
            victim = self._evictable(now, ip)
            if victim is None:
                self._refuse(self.node, "handshakes")
                return None
            self.evicted_handshakes += 1
            self.end_handshake(victim)
            if victim.evict is not None:
                victim.evict()
        ticket = HandshakeTicket(
            ip, "" if self._exempt(ip) else ip_prefix(ip), now, self.handshake_deadline()
        )
        self._pending.append(ticket)
        self.node.pending += 1
        self._ip_pending[ip] = self._ip_pending.get(ip, 0) + 1
        prefix = self._prefix(ip)
        if prefix is not None:
            prefix.pending += 1
        return ticket

    def _accept_rate_ok(self, ip: str, now: float) -> bool:
        """Token buckets of new connections per IP and per prefix (a peer whose handshakes keep
        being evicted or dropped just reconnects: this bounds what that costs)."""
        lim = self.limits
        buckets = self._accept_buckets
        if len(buckets) > 65536:
            buckets.clear()  # bounded; a reset only forgives
        prefix = "p:" + ip_prefix(ip)
        for key, rate in ((ip, lim.ip_accept_rate), (prefix, lim.prefix_accept_rate)):
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = TokenBucket(rate, 2 * rate, now)
            if not bucket.take(now):
                self._refuse(self.node, "accept_rate_ip" if key == ip else "accept_rate_prefix")
                return False
        return self._fair_second(prefix, now)

    def _fair_second(self, prefix: str, now: float) -> bool:
        """The node-wide rate of new connections, shared fairly: once ``node_accept_rate`` were
        admitted this second, a prefix is admitted only while it holds less than an equal share of
        them. A Sybil reconnecting from many prefixes is held to the rate; a newcomer from a prefix
        that is not flooding still gets in."""
        if now - self._second >= 1.0:
            self._second, self._admitted, self._admitted_total = now, {}, 0
        mine = self._admitted.get(prefix, 0)
        if self._admitted_total >= self.limits.node_accept_rate:
            share = self.limits.node_accept_rate / (len(self._admitted) + (prefix not in self._admitted))
            if mine >= share:
                self._refuse(self.node, "accept_rate_node")
                return False
        self._admitted[prefix] = mine + 1
        self._admitted_total += 1
        return True

    def _evictable(self, now: float, newcomer: str) -> HandshakeTicket | None:
        """The pending handshake to sacrifice for a newcomer from IP ``newcomer``: the oldest of the
        prefix holding the most, if that prefix holds more than the newcomer's would (fairness
        between prefixes, whatever their age); else the oldest one older than ``evict_after`` (a
        socket silent that long is not a peer completing a handshake)."""
        counts: dict[str, int] = {}
        for t in self._pending:
            counts[t.prefix] = counts.get(t.prefix, 0) + 1
        counts.pop("", None)
        mine = 0 if self._exempt(newcomer) else counts.get(ip_prefix(newcomer), 0)
        if counts:
            worst_prefix, worst = max(counts.items(), key=lambda kv: kv[1])
            if worst > mine + 1:
                return next(t for t in self._pending if t.prefix == worst_prefix)
        oldest = self._pending[0] if self._pending else None
        if oldest is not None and now - oldest.started >= self.limits.evict_after:
            return oldest
        return None

    def end_handshake(self, ticket: HandshakeTicket) -> None:
        if ticket.done:
            return
        ticket.done = True
        self._pending.remove(ticket)
        self.node.pending -= 1
        left = self._ip_pending.get(ticket.ip, 0) - 1
        if left > 0:
            self._ip_pending[ticket.ip] = left
        else:
            self._ip_pending.pop(ticket.ip, None)
        prefix = self._prefix(ticket.ip)
        if prefix is not None:
            prefix.pending -= 1
            self._forget_if_idle(prefix)

    @property
    def pending_handshakes(self) -> int:
        return self.node.pending

    # -- connections and streams
    def accepting(self) -> bool:
        """Room for one more connection at all (checked at accept, before any handshake work)."""
        if self.node.conns + self.node.pending < self.limits.max_connections:
            return True
        self._refuse(self.node, "connections")
        return False

    def open_connection(self, peer: Hashable, ip: str | None) -> None:
        """Count a secured connection of ``peer`` from ``ip``; raises ResourceLimitExceeded when the
        node, the prefix or the peer has no connection to spare."""
        lim = self.limits
        prefix = self._prefix(ip)
        peer_scope = self._peer(peer)
        checks = [(self.node, lim.max_connections), (peer_scope, lim.peer_connections)]
        if prefix is not None:
            checks.append((prefix, lim.prefix_connections))
        for scope, limit in checks:
            if scope.conns >= limit:
                self._refuse(scope, "connections")
                for s in (peer_scope, prefix):
                    if s is not None:
                        self._forget_if_idle(s)
                raise ResourceLimitExceeded(scope.kind, "connections", 1, scope.conns, limit)
        if prefix is not None:
            self._peer_prefix[peer] = prefix.name
            prefix.conns += 1
        self.node.conns += 1
        peer_scope.conns += 1

    def close_connection(self, peer: Hashable, ip: str | None) -> None:
        self.node.conns = max(0, self.node.conns - 1)
        peer_scope = self._peers.get(peer)
        if peer_scope is not None:
            peer_scope.conns = max(0, peer_scope.conns - 1)
        prefix = self._prefixes.get(ip_prefix(ip)) if not self._exempt(ip) and ip else None
        if prefix is not None:
            prefix.conns = max(0, prefix.conns - 1)
            self._forget_if_idle(prefix)
        if peer_scope is not None:
            self._forget_if_idle(peer_scope)

    def try_open_stream(self, peer: Hashable) -> bool:
        lim = self.limits
        scope = self._peer(peer)
        if self.node.streams >= lim.max_streams:
            self._refuse(self.node, "streams")
        elif scope.streams >= lim.peer_streams:
            self._refuse(scope, "streams")
        else:
            self.node.streams += 1
            scope.streams += 1
            return True
        self._forget_if_idle(scope)
        return False

    def close_stream(self, peer: Hashable) -> None:
        self.node.streams = max(0, self.node.streams - 1)
        scope = self._peers.get(peer)
        if scope is not None:
            scope.streams = max(0, scope.streams - 1)
            self._forget_if_idle(scope)

    # -- reporting
    def peer_usage(self, peer: Hashable) -> dict:
        scope = self._peers.get(peer)
        return scope.row() if scope is not None else _Scope("peer", str(peer)).row()

    def stats(self, top: int = 8) -> dict:
        """Usage and limits per scope (status, /metrics, the web page): the node, the services, and
        the peers and prefixes holding the most memory."""

        def heaviest(scopes: dict) -> list[dict]:
            rows = sorted(scopes.values(), key=lambda s: (s.memory, s.streams, s.conns), reverse=True)
            return [{"name": s.name, **s.row()} for s in rows[:top]]

        lim = self.limits
        return {
            "node": {
                **self.node.row(),
                "memory_limit": self.max_memory,
                "connections_limit": lim.max_connections,
                "streams_limit": lim.max_streams,
                "pending_handshakes_limit": lim.max_pending_handshakes,
            },
            "limits": {
                "peer_memory": int(self.max_memory * lim.peer_memory),
                "prefix_memory": int(self.max_memory * lim.prefix_memory),
                "peer_connections": lim.peer_connections,
                "peer_streams": lim.peer_streams,
                "prefix_connections": lim.prefix_connections,
            },
            "services": {
                name: {**scope.row(), "memory_limit": limit}
                for name, (scope, limit) in self._services.items()
            },
            "peers": heaviest(self._peers),
            "prefixes": heaviest(self._prefixes),
            "tracked_peers": len(self._peers),
            "refusals": dict(self.refusals),
            "evicted_handshakes": self.evicted_handshakes,
        }
