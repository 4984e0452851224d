"""The Kademlia key space: 256-bit ids (sha256, as in the libp2p spec) and XOR distance."""

from __future__ import annotations

import hashlib

from lattice.identity import PeerId

ID_BITS = 256


def key_id(key: bytes) -> int:
    """Position of a record key (or a peer id's bytes) in the key space."""
    return int.from_bytes(hashlib.sha256(key).digest(), "big")


def peer_key(peer: PeerId) -> int:
    return key_id(peer.multihash)


def distance(a: int, b: int) -> int:
    return a ^ b


def bucket_index(local: int, other: int) -> int:
    """Index of the k-bucket for ``other``: 255 minus the common prefix length (-1 for ourselves)."""
    return (local ^ other).bit_length() - 1
