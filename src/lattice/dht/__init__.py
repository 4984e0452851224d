"""Kademlia DHT: signed expiring records with subkeys, providers, persistence, simulator."""

from lattice.dht.records import RecordError, register_validator
from lattice.dht.service import DHT, DHTConfig, Entry

__all__ = ["DHT", "DHTConfig", "Entry", "RecordError", "register_validator"]
