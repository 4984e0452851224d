"""NAT traversal and local discovery, on top of the host: reachability (AutoNAT), circuit relay v2
(client and server), DCUtR hole punching, UPnP/NAT-PMP port mapping and mDNS. The host knows none
of them; :class:`NATManager` installs their protocol handlers and the relayed dialer on a host."""

from lattice.nat.manager import NATConfig, NATManager

__all__ = ["NATConfig", "NATManager"]
