"""Transport: a libp2p-compatible host (TCP, Noise, Yamux, identify, ping) and connection management."""

from lattice.multiaddr import Multiaddr, MultiaddrError
from lattice.transport.host import Connection, Host, HostConfig
from lattice.transport.peerstore import PeerInfo
from lattice.transport.stack import open_host

__all__ = ["Connection", "Host", "HostConfig", "Multiaddr", "MultiaddrError", "PeerInfo", "open_host"]
