"""Hostile peers of the content service (issue 20), against real daemons.

- :func:`stalled_requests`: identities that open many ``content.chunks`` requests, read the first
  reply and then stop reading (small windows), so every accepted request holds the victim's chunk
  buffer and serving slot (without admission per peer the victim accepted them all);
- :func:`malformed_requests`: chunk requests a real fetcher never sends (junk ids, too many chunks,
  indices out of range), which should cost the sender until it is cut off;
- :func:`rogue_provider`: a provider (a node of ours with hand-written handlers) that serves the real
  manifest and corrupt, oversized or unasked-for chunks, while the victim fetches from it and from an
  honest provider.

Each takes the victim's multiaddr (and what else it needs) and returns a dict of what happened.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import trio

from lattice.errors import LatticeError, StreamError
from lattice.identity import KeyPair
from lattice.rpc import wire
from lattice.transport import HostConfig, open_host

from .transport import RSSWatch

RPC = "/lattice/rpc/1.0.0"
CHUNKS = "content.chunks"
MANIFEST = "content.manifest"
MIB = 1 << 20


async def _first_reply(stream) -> str:
    """What the victim answers first on a call stream: "chunk", an error type, or "reset"."""
    try:
        message = await wire.receive(stream, 8 * MIB)
    except (StreamError, LatticeError) as exc:
        return "reset" if isinstance(exc, StreamError) else type(exc).__name__
    if message.kind == wire.ERR:
        return str(message.error_type)
    return "chunk" if message.kind == wire.MSG else message.kind


async def stalled_requests(
    target: str,
    cid: str,
    chunks: int,
    identities: int = 4,
    per_identity: int = 48,
    hold: float = 3.0,
    victim_pid: int | None = None,
) -> dict:
    """``identities`` peers, each opening ``per_identity`` requests for up to 16 chunks of ``cid``
    (which has ``chunks`` chunks), reading one reply each and then nothing for ``hold`` seconds."""
    watch = RSSWatch(victim_pid) if victim_pid else None
    answers: Counter[str] = Counter()
    started = time.monotonic()

    async def identity(nursery_done: trio.Event) -> None:
        config = HostConfig(stream_window=256 << 10)  # the spec's minimum: we hold little ourselves
        async with open_host(KeyPair.generate(), config) as host:
            conn = await host.connect(target)

            async def request(i: int) -> None:
                indices = [(i * 16 + k) % chunks for k in range(min(16, chunks))]
                try:
                    stream = await host.new_stream(conn, [RPC])
                    await wire.send(
                        stream,
                        wire.CALL,
                        {"cid": cid, "chunks": indices},
                        has_value=True,
                        method=CHUNKS,
                        end=True,
                    )
                except (StreamError, LatticeError) as exc:
                    answers[type(exc).__name__] += 1
                    return
                answers[await _first_reply(stream)] += 1
                await nursery_done.wait()  # and read nothing more

            async with trio.open_nursery() as requests:
                for i in range(per_identity):
                    requests.start_soon(request, i)

    done = trio.Event()
    async with trio.open_nursery() as nursery:
        if watch is not None:
            nursery.start_soon(watch.run)
        async with trio.open_nursery() as peers:
            for _ in range(identities):
                peers.start_soon(identity, done)
            await trio.sleep(hold)
            done.set()
        nursery.cancel_scope.cancel()
    out = {
        "requests": identities * per_identity,
        "answers": dict(answers),
        "accepted": answers["chunk"],
        "refused": answers["ContentBusy"],
        "seconds": round(time.monotonic() - started, 2),
    }
    if watch is not None:
        out.update(victim_rss_start_mib=round(watch.start, 1), victim_rss_peak_mib=round(watch.peak, 1))
    return out


MALFORMED = [
    {"cid": "not a cid", "chunks": [0]},
    {"cid": None, "chunks": [0]},
    "just a string",
    {"chunks": list(range(100_000))},
]


async def malformed_requests(target: str, cid: str, count: int = 40) -> dict:
    """Requests a real fetcher never sends, one stream each, until the victim cuts us off."""
    replies: Counter[str] = Counter()
    cut_off_after = None
    payloads = [*MALFORMED, {"cid": cid, "chunks": list(range(10_000))}, {"cid": cid, "chunks": [1 << 39]}]
    async with open_host(KeyPair.generate()) as host:
        conn = await host.connect(target)
        for i in range(count):
            try:
                with trio.fail_after(5):
                    stream = await host.new_stream(conn, [RPC])
                    await wire.send(stream, wire.CALL, payloads[i % len(payloads)], has_value=True,
                                    method=CHUNKS, end=True)  # fmt: skip
                    replies[await _first_reply(stream)] += 1
            except (LatticeError, trio.TooSlowError, OSError) as exc:
                replies[type(exc).__name__] += 1
                if conn.closed or host.connection_to(conn.remote_peer) is None:
                    cut_off_after = i
                    break
    return {"sent": sum(replies.values()), "replies": dict(replies), "cut_off_after": cut_off_after}


async def rogue_provider(
    victim_control: Path,
    honest: str,
    cid: str,
    mode: str = "corrupt",
    output: str | None = None,
    data_dir: Path | None = None,
) -> dict:
    """A provider that serves ``cid``'s real manifest (fetched from ``honest``, as anyone can) and
    bad chunks: ``corrupt`` (random bytes of the right size), ``oversized`` (64 MiB per reply) or
    ``unasked`` (a chunk that was not asked for). The victim daemon is told (control socket) to get
    ``cid`` from the rogue and from ``honest``. Returns the victim's answer and what the rogue did."""
    from contextlib import AsyncExitStack

    from lattice import Node, NodeConfig
    from lattice.control.client import Client
    from lattice.dht.service import DHT
    from lattice.rpc import RPC as RPCService

    served: Counter[str] = Counter()
    rpc = RPCService()

    async def manifest(payload: Any, ctx: Any):
        served["manifest"] += 1
        yield np.frombuffer(box["manifest"], np.uint8)

    async def chunks(payload: Any, ctx: Any):
        for index in payload["chunks"]:
            served["chunks"] += 1
            if mode == "oversized":
                yield {"i": index, "d": np.zeros(64 * MIB, np.uint8)}
            elif mode == "unasked":
                yield {"i": index + 10_000, "d": np.zeros(16, np.uint8)}
            else:
                yield {"i": index, "d": np.frombuffer(os.urandom(box["chunk"]), np.uint8)}

    rpc.register(MANIFEST, manifest, stream="server")
    rpc.register(CHUNKS, chunks, stream="server")
    box: dict[str, Any] = {}
    cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=data_dir or Path(f"/tmp/rogue-{os.getpid()}"),
                     control=False)  # fmt: skip
    async with AsyncExitStack() as stack:
        node = await stack.enter_async_context(Node(cfg, services=[rpc, DHT()]))
        async with node.rpc.call_stream(honest, MANIFEST, {"cid": cid}, as_torch=False) as items:
            async for item in items:
                box["manifest"] = item.tobytes()
        import json

        box["chunk"] = json.loads(box["manifest"])["chunk_size"]

        def get() -> Any:
            with Client(victim_control) as client:
                try:
                    items = list(
                        client.stream(
                            "content.get", cid=cid, output=output, providers=[node.addrs[0], honest]
                        )
                    )
                except LatticeError as exc:
                    return {"error": str(exc)}
                return items[-1] if items else None

        result = await trio.to_thread.run_sync(get)
    return {"mode": mode, "served": dict(served), "victim": result, "rogue": str(node.peer_id)}
