"""``/dnsaddr/<domain>`` bootstrap addresses, resolved as go- and rust-libp2p resolve them.

An operator publishes a swarm's bootstrap list in DNS, so it changes without a release: TXT records
under ``_dnsaddr.<domain>``, each ``dnsaddr=<multiaddr>``. A value may itself be a ``/dnsaddr/``
address (resolved again, as deep as ``DnsaddrLimits.max_depth``); an address that ends in
``/p2p/<id>`` keeps only the values ending in that id. Every bound is checked before the next query:
levels, lookups, TXT strings per lookup, addresses returned and the whole resolution's time, so a
hostile or broken zone costs a bounded number of queries. TXT values are parsed as multiaddrs only.
DNS itself goes through dnspython (async, under trio), to the system's resolvers or the ones given.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from lattice.errors import DialError, LatticeError
from lattice.identity import PeerId
from lattice.multiaddr import Multiaddr

__all__ = ["DnsaddrError", "DnsaddrLimits", "dns_lookup", "resolve", "resolve_all", "txt_addrs"]

log = logging.getLogger(__name__)

PREFIX = "dnsaddr="

Lookup = Callable[[str], Awaitable[list[str]]]  # name -> its TXT strings ([] if none)


class DnsaddrError(DialError):
    """A /dnsaddr/ address could not be resolved (DNS failed, or its records named no address)."""


@dataclass(frozen=True)
class DnsaddrLimits:
    """What resolving one /dnsaddr/ address may cost (the first three as rust-libp2p's dns transport)."""

    max_depth: int = 4  # nested /dnsaddr/ levels below the first
    max_lookups: int = 32  # TXT queries in all
    max_records: int = 16  # TXT strings used from one answer
    max_addrs: int = 32  # addresses returned
    timeout: float = 10.0  # seconds for the whole resolution
    txt_max_len: int = 1024  # a longer TXT value is skipped (a multiaddr is far shorter)


def txt_addrs(values: list[str], limits: DnsaddrLimits = DnsaddrLimits()) -> list[Multiaddr]:
    """The multiaddrs in ``dnsaddr=`` TXT values (others and unparsable ones skipped), in order."""
    out = []
    for value in values[: limits.max_records]:
        if not value.startswith(PREFIX) or len(value) > limits.txt_max_len:
            continue
        try:
            out.append(Multiaddr.parse(value[len(PREFIX) :]))
        except LatticeError:
            continue
    return out


def _domain(addr: Multiaddr) -> str | None:
    return addr.value_of("dnsaddr") if addr.parts and addr.parts[0][0] == "dnsaddr" else None


def _wanted(found: Multiaddr, peer: PeerId | None) -> bool:
    """Keep ``found`` for a query that named ``peer``: only if it names the same peer (spec)."""
    return peer is None or found.peer_id == peer


async def resolve(
    addr: Multiaddr, lookup: Lookup, limits: DnsaddrLimits = DnsaddrLimits()
) -> list[Multiaddr]:
    """The dialable addresses behind ``addr`` (itself if it is not /dnsaddr/); DnsaddrError if none."""
    domain = _domain(addr)
    if domain is None:
        return [addr]
    out: list[Multiaddr] = []
    lookups = 0
    seen: set[str] = set()
    # breadth-first: (domain, peer the query named, depth)
    queue: list[tuple[str, PeerId | None, int]] = [(domain, addr.peer_id, 0)]
    with trio.move_on_after(limits.timeout) as scope:
        while queue and len(out) < limits.max_addrs and lookups < limits.max_lookups:
            name, peer, depth = queue.pop(0)
            if name in seen:  # a record naming its own domain, or a loop
                continue
            seen.add(name)
            lookups += 1
            try:
                values = await lookup(f"_dnsaddr.{name}")
            except DnsaddrError:
                if depth == 0:
                    raise
                continue  # a nested name that fails: its siblings may still answer
            for found in txt_addrs(values, limits):
                if not _wanted(found, peer):
                    continue
                inner = _domain(found)
                if inner is not None:
                    if depth < limits.max_depth:
                        queue.append((inner, found.peer_id or peer, depth + 1))
                elif found.tcp_target() is not None and found not in out:
                    out.append(found)
    out = out[: limits.max_addrs]
    if not out:
        why = (
            f"timed out after {limits.timeout:.0f} s"
            if scope.cancelled_caught
            else "no address in its TXT records"
        )
        raise DnsaddrError(f"{addr}: {why} (_dnsaddr.{domain})")
    return out


def dns_lookup(servers: tuple[str, ...] = (), timeout: float = 5.0) -> Lookup:
    """A TXT lookup through dnspython: the system's resolvers, or ``servers`` ("IP" or "IP:PORT")."""
    import dns.asyncresolver
    import dns.exception
    import dns.resolver

    resolver = dns.asyncresolver.Resolver(configure=not servers)
    if servers:
        resolver.nameservers = [s.rsplit(":", 1)[0] if _has_port(s) else s for s in servers]
        ports = {int(s.rsplit(":", 1)[1]) for s in servers if _has_port(s)}
        if ports:
            resolver.port = ports.pop()
    resolver.lifetime = timeout

    async def lookup(name: str) -> list[str]:
        try:
            answer = await resolver.resolve(name, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            raise DnsaddrError(f"DNS lookup of {name} failed: {exc}") from None
        return [b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer]

    return lookup


def _has_port(server: str) -> bool:
    return server.count(":") == 1  # IPv4:PORT (an IPv6 address has more colons and no port here)


async def resolve_all(
    addrs: list[Multiaddr], lookup: Lookup | None = None, limits: DnsaddrLimits = DnsaddrLimits()
) -> list[Multiaddr]:
    """Bootstrap addresses with every /dnsaddr/ one resolved; one that fails is logged and left out."""
    out: list[Multiaddr] = []
    for addr in addrs:
        if _domain(addr) is None:
            out.append(addr)
            continue
        try:
            found = await resolve(addr, lookup or dns_lookup(), limits)
        except DnsaddrError as exc:
            log.warning("bootstrap address not resolved: %s", exc)
            continue
        log.info("bootstrap %s resolved to %d address(es)", addr, len(found))
        out += [a for a in found if a not in out]
    return out
