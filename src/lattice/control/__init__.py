"""The daemon's local control API (server side) and the Client other processes use."""

from lattice.control.client import Client, ControlRemoteError, RemoteError

__all__ = ["Client", "ControlRemoteError", "RemoteError"]
