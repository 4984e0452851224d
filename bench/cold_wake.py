"""bench/cold_wake: what the same small piece of work costs after the CPU idled, spun, or not at all.

    python bench/cold_wake.py [--reps 300] [--rounds 2]

The work is what a small message needs outside our own Python: one AES-256-GCM encrypt of 70
bytes, one msgpack pack of a call header, one struct pack. It runs right after (a) a 10 ms sleep
(the process idles, as a node does between calls one WAN round trip apart), (b) 10 ms of spinning,
(c) 10 ms of spinning over 8 MiB of memory (our caches evicted by other work), (d) nothing (back
to back). One JSON line per round with the median microseconds of each. Why: on this VM (a) costs
far more than (c), so a cold call's cost is the idle itself, paid by every object and code path
touched after the wake, not by the count of instructions (docs/perf.md, "Small-message fast paths").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import time

import msgpack
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_AEAD = AESGCM(os.urandom(32))
_PLAIN = os.urandom(70)
_NONCE = bytes(12)
_HEADER = {"k": "call", "i": 123, "m": "lattice.bench.echo", "d": b"x" * 8}
_MEMORY = bytearray(8 << 20)


def work() -> None:
    _AEAD.encrypt(_NONCE, _PLAIN, None)
    msgpack.packb(_HEADER)
    struct.pack(">H", 70)


def sleep() -> None:
    time.sleep(0.01)


def spin() -> None:
    end = time.perf_counter() + 0.01
    while time.perf_counter() < end:
        pass


def spin_memory() -> None:
    end, i, n = time.perf_counter() + 0.01, 0, len(_MEMORY)
    while time.perf_counter() < end:
        _MEMORY[i % n] = 1
        i += 4096


def median_us(before, reps: int) -> float:
    samples = []
    for _ in range(reps):
        if before is not None:
            before()
        start = time.perf_counter_ns()
        work()
        samples.append(time.perf_counter_ns() - start)
    return round(statistics.median(samples) / 1e3, 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for rnd in range(args.rounds):
        line = {"bench": "cold_wake", "round": rnd, "load": round(os.getloadavg()[0], 2)}
        for name, before in (("after_sleep_us", sleep), ("after_spin_us", spin),
                             ("after_spin_8mib_us", spin_memory), ("back_to_back_us", None)):  # fmt: skip
            line[name] = median_us(before, args.reps)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
