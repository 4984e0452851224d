"""Kademlia DHT: signed expiring records, subkeys, providers (sans-IO core + simulator so far)."""
