"""Plug-in applications built only on the node's public services (rpc, dht, crdt)."""
