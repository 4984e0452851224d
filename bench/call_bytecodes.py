"""bench/call_bytecodes: Python bytecodes the caller runs per small call, by module and function.

    python bench/call_bytecodes.py [--calls 50] [--top 25]

An embedded node calls a `lattice-node` daemon's ``lattice.bench.echo`` (8 bytes) over its fast
lane, 10 ms apart, with ``sys.settrace`` counting opcode events during each call (the send, the
wait, the reply's receive and parse; trio's scheduler included). Unlike times on this VM the count
does not drift, so it says at once whether a change to the small-message path made it shorter.
One JSON line: bytecodes per call in all and per module; then the top functions, as text.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import trio

from lattice import Node
from lattice.config import NodeConfig
from lattice.testing.daemons import start_daemon

_counts: collections.Counter[tuple[str, str]] = collections.Counter()


def _short(filename: str) -> str:
    return filename.split("site-packages/")[-1].split("src/")[-1]


def _tracer(frame, event, arg):
    frame.f_trace_opcodes = True
    if event == "opcode":
        code = frame.f_code
        _counts[(_short(code.co_filename), code.co_name)] += 1
    return _tracer


async def _calls(addr: str, calls: int) -> None:
    config = NodeConfig(listen=("/ip4/127.0.0.1/tcp/0",), control=False, data_dir=Path(tempfile.mkdtemp()))
    async with Node(config) as node:
        await node.connect(addr)
        for _ in range(50):  # warm-up: the lane, buffers
            await node.rpc.call(addr, "lattice.bench.echo", b"x" * 8)
        for _ in range(calls):
            await trio.sleep(0.01)
            sys.settrace(_tracer)
            await node.rpc.call(addr, "lattice.bench.echo", b"x" * 8)
            sys.settrace(None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = start_daemon(Path(tmp), "callee", ["--listen", "/ip4/127.0.0.1/tcp/0", "--enable-bench"])
        try:
            trio.run(_calls, daemon.info["addrs"][0], args.calls)
        finally:
            daemon.stop()
    per_module: collections.Counter[str] = collections.Counter()
    for (filename, _), count in _counts.items():
        per_module["trio" if filename.startswith("trio/") else filename] += count
    n = args.calls
    line = {
        "bench": "call_bytecodes",
        "calls": n,
        "bytecodes_per_call": round(sum(_counts.values()) / n, 1),
        "per_module": {m: round(c / n, 1) for m, c in per_module.most_common(12)},
    }
    print(json.dumps(line), flush=True)
    for (filename, function), count in _counts.most_common(args.top):
        print(f"{count / n:8.1f}  {filename}:{function}")


if __name__ == "__main__":
    main()
