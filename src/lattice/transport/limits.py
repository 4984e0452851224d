"""Peer limits for a swarm open to strangers: connection caps per IP, token-bucket rate limits per
peer and per (peer, protocol), a misbehaviour score, and bans (peer id and IP) that expire.

The host asks before it accepts a socket (IP banned? too many connections from it?), after the
handshake (peer banned?) and before it serves a stream; services report misbehaviour (malformed
messages) with :meth:`PeerLimits.penalize`. Points decay over time, so an honest peer that hit a
limit once is forgiven; a peer that keeps sending junk crosses ``ban_score`` within a few messages.

Addresses in ``exempt_ips`` (default: 127.0.0.1 and ::1, where a local testnet lives) are never
capped or banned by IP; their peers can still be banned by peer id.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, fields

from lattice.errors import ConfigError

__all__ = ["Limits", "PeerLimits", "TokenBucket", "ip_prefix"]

MAX_TRACKED = 65536  # buckets and scores kept at most (oldest dropped): bounded memory under churn


@dataclass(frozen=True)
class Limits:
    """What one peer may cost a node (a swarm profile's ``[swarm.NAME.limits]``)."""

    max_conns_per_ip: int = 16
    streams_per_s: float = 500.0  # inbound streams of one peer, all protocols (rate) ...
    streams_burst: float = 1000.0  # ... and burst
    protocol_per_s: float = 500.0  # inbound streams or requests of one peer on one protocol
    protocol_burst: float = 1000.0
    ban_score: float = 100.0  # misbehaviour points that get a peer banned
    ban_seconds: float = 600.0
    score_decay_per_s: float = 1.0  # points forgiven per second
    exempt_ips: tuple[str, ...] = ("127.0.0.1", "::1")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "exempt_ips":
                if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                    raise ConfigError("exempt_ips must be a list of IP addresses")
                object.__setattr__(self, f.name, tuple(value))
            elif not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"swarm limit {f.name} must be a positive number")


@functools.lru_cache(maxsize=8192)  # parsing an address costs ~5 us; accept paths ask often
def ip_prefix(ip: str) -> str:
    """The block a budget per IP prefix charges ``ip`` to: its /24 (IPv4) or /48 (IPv6). One operator
    usually holds a whole such block, so sybils from it share one budget."""
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return ip  # not an address (a test's peer name): counts as itself
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    bits = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False))


class TokenBucket:
    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def take(self, now: float, n: float = 1.0) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


# Points per kind of misbehaviour (services may pass their own).
PENALTY_THROTTLED = 1.0
PENALTY_MALFORMED = 10.0


class PeerLimits:
    """State of the limits for one host. Peers are opaque hashable ids (PeerId)."""

    def __init__(self, limits: Limits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or Limits()
        self.clock = clock
        self._conns_per_ip: Counter[str] = Counter()
        self._peer_buckets: dict[object, TokenBucket] = {}
        self._proto_buckets: dict[tuple[object, str], TokenBucket] = {}
        self._scores: dict[object, tuple[float, float]] = {}  # peer -> (points, when)
        self._peer_ip: dict[object, str] = {}
        self.banned_peers: dict[object, float] = {}  # peer -> until (clock)
        self.banned_ips: dict[str, float] = {}
        self.throttled: Counter[str] = Counter()
        self.refused_connections = 0
        self.bans_total = 0
        self.ban_reasons: dict[str, str] = {}  # str(peer) -> reason (last few)

    # -- connections
    def exempt(self, ip: str) -> bool:
        return ip in self.limits.exempt_ips

    def prefix_of(self, ip: str | None) -> str | None:
        """The IP prefix budgets per prefix charge ``ip`` to; None for an exempt or unknown address."""
        if ip is None or self.exempt(ip):
            return None
        try:
            return ip_prefix(ip)
        except ValueError:
            return None

    def accept_ip(self, ip: str) -> bool:
        """May a socket from ``ip`` proceed to the handshake? Counts it if so (see :meth:`release_ip`)."""
        if not self.exempt(ip):
            until = self.banned_ips.get(ip)
            if until is not None:
                if until > self.clock():
                    self.refused_connections += 1
                    return False
                del self.banned_ips[ip]
            if self._conns_per_ip[ip] >= self.limits.max_conns_per_ip:
                self.refused_connections += 1
                return False
        self._conns_per_ip[ip] += 1
        return True

    def release_ip(self, ip: str) -> None:
        self._conns_per_ip[ip] -= 1
        if self._conns_per_ip[ip] <= 0:
            del self._conns_per_ip[ip]

    def accept_peer(self, peer: object, ip: str | None = None) -> bool:
        """May this (authenticated) peer keep its connection?"""
        if ip is not None:
            self._peer_ip[peer] = ip
            if len(self._peer_ip) > MAX_TRACKED:
                self._peer_ip.pop(next(iter(self._peer_ip)))
        if self.is_banned(peer):
            self.refused_connections += 1
            return False
        return True

    def is_banned(self, peer: object) -> bool:
        until = self.banned_peers.get(peer)
        if until is None:
            return False
        if until > self.clock():
            return True
        del self.banned_peers[peer]
        return False

    # -- rate limits
    def _bucket(self, table: dict, key: object, rate: float, burst: float, now: float) -> TokenBucket:
        bucket = table.get(key)
        if bucket is None:
            if len(table) >= MAX_TRACKED:
                table.pop(next(iter(table)))
            bucket = table[key] = TokenBucket(rate, burst, now)
        return bucket

    def allow_stream(self, peer: object) -> bool:
        """An inbound stream from ``peer`` (before negotiation): the per-peer budget."""
        now = self.clock()
        lim = self.limits
        if self._bucket(self._peer_buckets, peer, lim.streams_per_s, lim.streams_burst, now).take(now):
            return True
        self.throttled["*"] += 1
        self.penalize(peer, PENALTY_THROTTLED, "stream rate limit")
        return False

    def allow(self, peer: object, protocol: str) -> bool:
        """One stream or request of ``protocol`` from ``peer``: the per-protocol budget."""
        now = self.clock()
        lim = self.limits
        bucket = self._bucket(
            self._proto_buckets, (peer, protocol), lim.protocol_per_s, lim.protocol_burst, now
        )
        if bucket.take(now):
            return True
        self.throttled[protocol] += 1
        self.penalize(peer, PENALTY_THROTTLED, f"rate limit on {protocol}")
        return False

    # -- misbehaviour and bans
    def score(self, peer: object) -> float:
        points, when = self._scores.get(peer, (0.0, 0.0))
        return max(0.0, points - (self.clock() - when) * self.limits.score_decay_per_s)

    def penalize(self, peer: object, points: float, reason: str) -> bool:
        """Add misbehaviour points; True if this ban-worthy peer is banned now."""
        if self.is_banned(peer):
            return False
        total = self.score(peer) + points
        if len(self._scores) >= MAX_TRACKED and peer not in self._scores:
            self._scores.pop(next(iter(self._scores)))
        self._scores[peer] = (total, self.clock())
        if total < self.limits.ban_score:
            return False
        self.ban(peer, reason)
        return True

    def ban(self, peer: object, reason: str, seconds: float | None = None) -> None:
        until = self.clock() + (seconds or self.limits.ban_seconds)
        self.banned_peers[peer] = until
        ip = self._peer_ip.get(peer)
        if ip is not None and not self.exempt(ip):
            self.banned_ips[ip] = until
        self._scores.pop(peer, None)
        self.bans_total += 1
        self.ban_reasons[str(peer)] = reason
        while len(self.ban_reasons) > 64:
            self.ban_reasons.pop(next(iter(self.ban_reasons)))

    def unban(self, target: object) -> bool:
        """Lift the ban of a peer id or an IP address (``str(peer)`` matches too); True if one was lifted."""
        lifted = self.banned_ips.pop(str(target), None) is not None
        for peer in [p for p in self.banned_peers if p == target or str(p) == str(target)]:
            del self.banned_peers[peer]
            lifted = True
            ip = self._peer_ip.get(peer)
            if ip is not None:
                self.banned_ips.pop(ip, None)
        return lifted

    def status(self) -> dict:
        now = self.clock()
        return {
            "banned": sum(1 for u in self.banned_peers.values() if u > now)
            + sum(1 for u in self.banned_ips.values() if u > now),
            "banned_peers": {str(p): round(u - now, 1) for p, u in self.banned_peers.items() if u > now},
            "banned_ips": {ip: round(u - now, 1) for ip, u in self.banned_ips.items() if u > now},
            "bans_total": self.bans_total,
            "ban_reasons": dict(self.ban_reasons),
            "throttled": dict(self.throttled),
            "refused_connections": self.refused_connections,
            "conns_per_ip_max": max(self._conns_per_ip.values(), default=0),
        }
