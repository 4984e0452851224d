"""A rogue CRDT peer for tests and bench/crdt: a real libp2p host (lattice.transport) that speaks
``/lattice/crdt/1.0.0`` to a daemon and sends it everything it must refuse.

    python -m attacks.crdt_rogue (from tests/) --target MULTIADDR --doc owned --owner PEER_ID \\
        [--open-doc public] [--rounds 5]

Each round, over fresh streams (a receiver resets a stream on a bad frame):
- forged: the owner's genuine updates (fetched by an ordinary sync) re-signed with garbage, their
  data tampered, or renumbered; and new updates claiming the owner as author with random signatures;
- unauthorized: well-formed updates signed by the rogue's own key (not a writer);
- oversized: an update over MAX_UPDATE, a frame header announcing 2 MiB, a frame of 1 MiB + 1;
- garbage: random bytes in a frame, msgpack of the wrong shape, random bytes as updates;
- wrong-doc: the owner's genuine updates of ``--open-doc`` pushed into ``--doc``;
- the same through the gossip mesh (``/meshsub/1.1.0``): forged batches, garbage RPCs;
- malformed Yjs: a valid signature from the rogue over garbage Yjs data in ``--open-doc``
  (a document anyone may write), and sync requests with nonsense version vectors.
Replays of genuine updates are sent too (they must count as duplicates, not change anything).
Prints one JSON line with how many of each it sent.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import struct
import sys
from collections import Counter
from typing import Any

import msgpack
import trio
from pycrdt import Doc, Map

from lattice._proto import encode_uvarint as _uvarint
from lattice.crdt.service import PROTOCOL_ID, TOPIC_PREFIX
from lattice.crdt.updates import MAX_UPDATE, SignedUpdate, sign
from lattice.errors import LatticeError
from lattice.identity import KeyPair, PeerId
from lattice.pubsub import protocol as pubsub_protocol
from lattice.transport import open_host
from lattice.transport.host import Host


def _frame(message: Any) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def _yjs_set(key: str, value: Any) -> bytes:
    doc: Doc = Doc()
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(bytes(event.update)))
    doc["root"] = Map()
    updates.clear()
    doc["root"][key] = value
    return updates[-1]


class Rogue:
    """The attacker. The daemon bans it (peer limits) after a dozen bad messages; like a real
    attacker it then comes back under a fresh identity (``identities`` counts them), so every kind
    of bad update still reaches the CRDT's own checks."""

    def __init__(self, target: str, doc: str, owner: PeerId, open_doc: str) -> None:
        self.target = target
        self.doc = doc
        self.owner = owner
        self.open_doc = open_doc
        self.sent: Counter[str] = Counter()
        self.seq = 0
        self.host: Host | None = None
        self.peer: PeerId | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Rogue:
        await self._stack.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.__aexit__(*exc)

    async def ensure_connected(self) -> None:
        """A live connection to the target; a new identity (key, host) if the old one was cut off."""
        if self.host is not None and self.peer is not None and self.host.connection_to(self.peer) is not None:
            return
        for _ in range(20):  # bounded: each try is a fresh identity
            await self._stack.aclose()
            self._stack = contextlib.AsyncExitStack()
            self.host = await self._stack.enter_async_context(open_host(KeyPair.generate()))
            self.seq = 0
            self.sent["identities"] += 1
            try:
                with trio.fail_after(10):
                    self.peer = (await self.host.connect(self.target)).remote_peer
                return
            except (LatticeError, trio.TooSlowError, OSError):
                await trio.sleep(0.1)
        raise LatticeError(f"could not reach {self.target} under 20 identities")

    async def _stream_send(
        self, chunks: list[bytes], kind: str, count: int = 1, protocol: str = PROTOCOL_ID
    ) -> None:
        """Send raw chunks on a fresh stream, then close (errors are expected: the peer resets)."""
        await self.ensure_connected()
        try:
            with trio.fail_after(10):
                stream = await self.host.new_stream(self.peer, [protocol])
                try:
                    for chunk in chunks:
                        await stream.write(chunk)
                    await stream.close()
                except LatticeError:
                    await stream.reset()
        except (LatticeError, trio.TooSlowError):
            pass
        self.sent[kind] += count

    async def _push(self, doc: str, updates: list[SignedUpdate | bytes], kind: str) -> None:
        raws = [u.encode() if isinstance(u, SignedUpdate) else u for u in updates]
        await self._stream_send([_frame({"t": "push", "doc": doc, "u": raws})], kind, len(raws))

    async def fetch(self, doc: str) -> list[SignedUpdate]:
        """An ordinary sync: what the daemon holds of ``doc`` (its updates are genuine)."""
        out: list[SignedUpdate] = []
        await self.ensure_connected()
        with trio.fail_after(10):
            stream = await self.host.new_stream(self.peer, [PROTOCOL_ID])
            await stream.write(_frame({"t": "sync", "doc": doc, "v": {}}))
            for _ in range(10_000):
                (length,) = struct.unpack(">I", await stream.read_exactly(4))
                message = msgpack.unpackb(await stream.read_exactly(length), raw=False)
                out.extend(SignedUpdate.decode(raw) for raw in message.get("u") or [])
                if message.get("last"):
                    break
            await stream.write(_frame({"t": "updates", "doc": doc, "u": [], "v": {}, "last": True}))
            await stream.close()
        return out

    async def round(self) -> None:
        genuine = [u for u in await self.fetch(self.doc) if u.author == self.owner]
        other = [u for u in await self.fetch(self.open_doc) if u.author == self.owner]
        data = _yjs_set("rogue", "was here")
        top = max((u.seq for u in genuine), default=0)
        # forged: genuine updates with a broken signature, tampered data, or moved to new seqs
        if genuine:
            g = genuine[-1]
            resigned = dataclasses.replace(g, seq=top + 1, signature=os.urandom(64))
            await self._push(self.doc, [resigned], "forged")
            await self._push(self.doc, [dataclasses.replace(g, seq=top + 1, data=data)], "forged")
            await self._push(self.doc, [dataclasses.replace(g, seq=top + 50)], "forged")
            await self._push(self.doc, genuine[-3:], "replayed")  # duplicates: no change
        chain = []
        for i in range(1, 6):  # a "chain" claiming the owner as author, random signatures
            seq = top + 100 + i
            chain.append(SignedUpdate(self.doc, self.owner, seq, data, os.urandom(64), os.urandom(32)))
        await self._push(self.doc, chain, "forged")
        # unauthorized: properly signed by a key that is not on the writer list
        self.seq += 1
        await self._push(self.doc, [sign(self.host.keypair, self.doc, self.seq, data)], "unauthorized")
        # wrong document: genuine owner updates of another document pushed into this one
        if other:
            await self._push(self.doc, other[:3], "wrong_doc")
            await self._push(self.doc, [sign(self.host.keypair, self.open_doc, 1, data)], "wrong_doc")
        # oversized
        huge = SignedUpdate(self.doc, self.owner, top + 200, b"\0" * (MAX_UPDATE + 1), os.urandom(64))
        await self._push(self.doc, [huge.encode()], "oversized")
        await self._stream_send([struct.pack(">I", 2 << 20) + os.urandom(64)], "oversized")
        big = os.urandom((1 << 20) + 1)
        await self._stream_send([struct.pack(">I", len(big)), big], "oversized")
        # garbage
        await self._stream_send([struct.pack(">I", 100) + os.urandom(100)], "garbage")
        await self._stream_send([_frame([1, 2, 3])], "garbage")
        await self._stream_send([_frame({"t": "push", "doc": self.doc, "u": "not a list"})], "garbage")
        await self._push(self.doc, [os.urandom(80) for _ in range(5)], "garbage")
        await self._stream_send([_frame({"t": "nonsense"})], "garbage")
        await self._stream_send([os.urandom(3)], "garbage")
        bad_versions = {"t": "sync", "doc": self.doc, "v": {"x": "y", str(self.owner): -5, "z": [1]}}
        await self._stream_send([_frame(bad_versions)], "garbage")
        # the same through the gossip mesh: forged and unauthorized batches, garbage RPCs
        topic = TOPIC_PREFIX + self.doc
        batch = msgpack.packb(
            [u.encode() for u in chain] + [sign(self.host.keypair, self.doc, max(self.seq, 1), data).encode()]
        )
        rpc = pubsub_protocol.RPC(
            subscriptions=[(True, topic)], messages=[pubsub_protocol.Message(topic, batch)]
        )
        body = pubsub_protocol.encode(rpc)
        await self._stream_send(
            [_uvarint(len(body)) + body], "gossip_forged", protocol=pubsub_protocol.PROTOCOL_ID
        )
        garbage = pubsub_protocol.encode(
            pubsub_protocol.RPC(messages=[pubsub_protocol.Message(topic, os.urandom(50))])
        )
        for chunk in (_uvarint(len(garbage)) + garbage, _uvarint(40) + os.urandom(40), _uvarint(3 << 20)):
            await self._stream_send([chunk], "gossip_garbage", protocol=pubsub_protocol.PROTOCOL_ID)
        # malformed Yjs data under a valid signature, in a document anyone may write
        junk = sign(self.host.keypair, self.open_doc, 1, os.urandom(40))
        await self._push(self.open_doc, [junk], "malformed")


async def main_async(args: argparse.Namespace) -> dict:
    async with Rogue(args.target, args.doc, PeerId.from_string(args.owner), args.open_doc) as rogue:
        for _ in range(args.rounds):
            for attempt in range(3):  # a ban can cut a round's sync short: start it again
                try:
                    await rogue.round()
                    break
                except (LatticeError, trio.TooSlowError, OSError):
                    if attempt == 2:
                        raise
                    rogue.peer = None  # the connection is going away: come back as someone else
        return dict(rogue.sent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--doc", required=True)
    parser.add_argument("--owner", required=True)
    parser.add_argument("--open-doc", default="public")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print(json.dumps(trio.run(main_async, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
