"""Which of a peer's addresses can plausibly reach it from here (scope-aware dialing).

Peers advertise every address they listen on: 127.0.0.1, their LAN address, the relays they hold
reservations on. Dialing one that cannot lead to the peer costs a whole dial timeout (the internet
silently drops packets for another network's private address) or reaches the wrong host (another
machine's 127.0.0.1:4001 is our own listener when we use the same port). So, from where we stand:

- never one of our own listen addresses;
- a loopback address only if the peer is on this machine (its other direct addresses are ours);
- a private address (RFC 1918, IPv6 ULA, link-local) only within a network we share with it: one of
  our interfaces' networks (the same LAN), or a private network we reached a peer in before over a
  direct connection (its /24, or the /16 holding both ends: a datacenter or testbed "internet" on
  10/8, a cluster's pod network, a VPN);
- public addresses and DNS names always.

A relayed address is judged by its relay's part (a loopback one is kept: the peer took it only if
it reached the relay over loopback, so it is on the relay's machine, and we may be too). Pure
functions: the host supplies the :class:`Vantage` (its interfaces, listen addresses, the networks
it reached).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from lattice.multiaddr import Multiaddr

__all__ = ["Vantage", "network_of", "plausible"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

REACHED_PREFIX = {4: 24, 6: 64}  # the network a reached private address stands for
WIDEST_SHARED = {4: 16, 6: 48}  # ... widened to include our end of the connection, at most this


@dataclass(frozen=True)
class Vantage:
    """Where a host stands: what decides which addresses of a peer can reach it."""

    own: frozenset[tuple[str, int]]  # our listen endpoints, wildcards expanded to each interface IP
    local_ips: frozenset[str]  # this machine's addresses (loopback included)
    networks: tuple[IPNetwork, ...]  # our interfaces' networks, then private networks we reached

    def shares(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(ip in net for net in self.networks if net.version == ip.version)


def network_of(ip: str, local: str | None = None) -> IPNetwork | None:
    """The network a private (non-loopback) address we reached directly stands for: its /24 (/64),
    widened to include our end ``local`` of the connection if both fit in one /16 (/48) (a routed
    private network: a cluster's pod network, a VPN). None for others (public addresses need no
    such memory)."""
    try:
        addr = ipaddress.ip_address(ip)
        ours = ipaddress.ip_address(local) if local else None
    except ValueError:
        return None
    if addr.is_loopback or not _is_private(addr):
        return None
    net = ipaddress.ip_network(f"{addr}/{REACHED_PREFIX[addr.version]}", strict=False)
    if ours is None or ours.version != addr.version or ours.is_loopback or ours in net:
        return net
    for prefix in range(REACHED_PREFIX[addr.version] - 1, WIDEST_SHARED[addr.version] - 1, -1):
        wider = net.supernet(new_prefix=prefix)
        if ours in wider:
            return wider
    return net


def plausible(addrs: Iterable[Multiaddr], vantage: Vantage) -> list[Multiaddr]:
    """The addresses of one peer worth a dial from ``vantage``, in their order (see the module)."""
    addrs = list(addrs)
    here = _on_this_machine(addrs, vantage)
    return [a for a in addrs if _worth(a, vantage, here)]


def _ip(addr: Multiaddr) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of a direct address or of a relayed address's relay part (None: a DNS name)."""
    net, host = addr.parts[0] if addr.parts else (None, None)
    if net not in ("ip4", "ip6") or host is None:
        return None
    return ipaddress.ip_address(host)


def _is_private(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_private or ip.is_link_local


def _on_this_machine(addrs: list[Multiaddr], vantage: Vantage) -> bool:
    """Every direct, non-loopback IP the peer lists is one of ours (or it lists none)."""
    for addr in addrs:
        if addr.is_relayed:
            continue
        ip = _ip(addr)
        if ip is None:
            if addr.tcp_target() is not None:  # a DNS name: somewhere else, as far as we know
                return False
            continue
        if not ip.is_loopback and str(ip) not in vantage.local_ips:
            return False
    return True


def _worth(addr: Multiaddr, vantage: Vantage, on_this_machine: bool) -> bool:
    ip = _ip(addr)
    if ip is None:
        return True  # a DNS name (or an address kind the dialer refuses with its own message)
    port = addr.value_of("tcp")
    if port is not None and (str(ip), int(port)) in vantage.own:
        return False
    if ip.is_loopback:  # a relay's: the peer reached it so (not ours, else it is one of ``own``)
        return on_this_machine or addr.is_relayed
    if ip.is_unspecified:
        return False
    if _is_private(ip):
        return vantage.shares(ip)
    return True
