"""The daemon's local control API (server side) and the Client other processes use."""

from lattice.control.client import Client, RemoteError

__all__ = ["Client", "RemoteError"]
