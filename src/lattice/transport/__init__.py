"""Transport: a libp2p-compatible host (TCP, Noise, Yamux, identify, ping) and connection management."""

from lattice.transport.host import Connection, Host, HostConfig, PeerInfo, open_host
from lattice.transport.multiaddr import Multiaddr, MultiaddrError

__all__ = ["Connection", "Host", "HostConfig", "Multiaddr", "MultiaddrError", "PeerInfo", "open_host"]
