"""Lattice: peer-to-peer networking for decentralized AI."""

__version__ = "0.1.0"
