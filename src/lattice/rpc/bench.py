"""Benchmark methods a daemon serves when started with ``--enable-bench``, and the driver behind
the ``rpc.bench`` control operation (used by ``bench/rpc.py`` and ``lattice-node rpc-bench``).

Off by default: a peer that may call ``source`` can make the node send up to ``MAX_SOURCE`` bytes, and
``echo`` and ``sink`` take messages of that size (within the caller's memory budget on this node).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import trio

from lattice.errors import PayloadError

MAX_SOURCE = 1 << 30
_ZEROS: dict[int, np.ndarray] = {}


def install(rpc: Any) -> None:
    @rpc.method("lattice.bench.echo", max_payload=MAX_SOURCE)
    async def echo(payload: Any) -> Any:
        return payload

    @rpc.method("lattice.bench.sink", max_payload=MAX_SOURCE)
    async def sink(payload: Any) -> int:
        return int(getattr(payload, "nbytes", len(payload) if isinstance(payload, bytes) else 0))

    @rpc.method("lattice.bench.source")
    async def source(nbytes: Any) -> np.ndarray:
        if not isinstance(nbytes, int) or not 0 <= nbytes <= MAX_SOURCE:
            raise PayloadError(f"source size must be an int in [0, {MAX_SOURCE}]")
        n = nbytes // 4
        if n not in _ZEROS:
            _ZEROS.clear()
            _ZEROS[n] = np.ones(n, dtype=np.float32)
        return _ZEROS[n]


async def run(
    rpc: Any, peer: str, size: int, count: int = 5, direction: str = "up", concurrency: int = 1
) -> dict:
    """Time ``count`` calls moving ``size`` bytes (float32) ``up`` (to peer), ``down`` or ``echo``.

    Returns seconds per call and MiB/s per call; ``concurrency`` > 1 runs that many calls at once and
    reports the wall time of the whole batch instead.
    """
    if direction not in ("up", "down", "echo"):
        raise PayloadError("direction must be up, down or echo")
    if not 0 <= size <= MAX_SOURCE or not 1 <= count <= 100_000 or not 1 <= concurrency <= 10_000:
        raise PayloadError("size, count or concurrency out of range")
    tensor = np.ones(size // 4, dtype=np.float32)
    small = size <= 64
    timeout = 60.0 + size / (1 << 20)  # 1 s per MiB on top: a GiB over a 50 Mbit/s link takes ~3 min

    async def once() -> None:
        if direction == "up":
            got = await rpc.call(peer, "lattice.bench.sink", tensor, timeout=timeout)
            if got != tensor.nbytes:
                raise PayloadError(f"sink got {got} of {tensor.nbytes} bytes")
        elif direction == "down":
            out = await rpc.call(peer, "lattice.bench.source", tensor.nbytes, timeout=timeout)
            if out.nbytes != tensor.nbytes:
                raise PayloadError("source returned the wrong size")
        else:
            await rpc.call(peer, "lattice.bench.echo", b"x" * size if small else tensor, timeout=timeout)

    await once()  # warm-up: connection, buffers
    if concurrency > 1:
        start = time.perf_counter()
        for _ in range(count):
            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(once)
        wall = time.perf_counter() - start
        return {"calls": count * concurrency, "wall_s": wall, "calls_per_s": count * concurrency / wall}
    times = []
    for _ in range(count):
        start = time.perf_counter()
        await once()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "times_s": times,
        "median_s": median,
        "mib_per_s": (size / 2**20) / median if size else None,
    }
