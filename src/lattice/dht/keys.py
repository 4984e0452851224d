"""The Kademlia key space: 256-bit ids (sha256, as in the libp2p spec) and XOR distance."""

from __future__ import annotations

import hashlib
import os

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


def bucket_probe_keys(local: int, buckets: int, tries: int = 4096) -> list[bytes]:
    """Random record keys in each of the ``buckets`` farthest k-buckets of ``local`` (255, 254, ...):
    looking them up fills those buckets (a key lands in bucket 255 - i with probability 2^-(i+1), so
    8 buckets take ~256 draws; a bucket not hit within ``tries`` draws is left out)."""
    wanted = set(range(ID_BITS - 1, ID_BITS - 1 - buckets, -1))
    found: dict[int, bytes] = {}
    for _ in range(tries):
        if len(found) == len(wanted):
            break
        key = os.urandom(32)
        index = bucket_index(local, key_id(key))
        if index in wanted and index not in found:
            found[index] = key
    return [found[i] for i in sorted(found, reverse=True)]
