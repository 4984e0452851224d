"""Applications built only on a node's public services (RPC, DHT, CRDT); torch lives here."""
