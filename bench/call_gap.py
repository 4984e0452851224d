"""bench/call_gap: small-call latency and CPU per call against the idle gap between calls.

    python bench/call_gap.py [--calls 200] [--gaps 0,10,40] [--rounds 2] [--profile DIR]

An embedded Node calls a `lattice-node` daemon's ``lattice.bench.echo`` (8 bytes) over loopback, with
``trio.sleep(gap)`` between calls; a plain TCP echo and a bare trio echo (two trio processes, no
Noise/Yamux/RPC: the event loop's own floor) run in the same round.
Why: on a WAN a user's calls are always spaced by the round trip, and spaced-out calls cost this VM
3-4x the CPU of back-to-back ones (caches and branch predictors go cold), so the critical path
(caller's send, callee's receive -> handler -> reply, caller's wake-up) must be measured cold.
One JSON line per gap and round: median ms (ours, plain TCP) and CPU ms per call (client, server).
``--profile DIR``: py-spy records the daemon (--nonblocking) while the calls run, into DIR/server-*.txt.
Base against branch: ``--trees BASE_DIR,BRANCH_DIR`` runs one copy per tree at the same time, so
both see the same load (alternating runs on this shared VM differ by more than the change).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from lattice import Node
from lattice.config import NodeConfig
from lattice.testing.daemons import start_daemon

_TCP_ECHO = (
    "import socket\ns = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
    "print(s.getsockname()[1], flush=True)\n"
    "c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n"
    "while (d := c.recv(64)):\n    c.sendall(d)\n"
)


_TRIO_ECHO = """
import trio
async def echo(stream):
    while (data := await stream.receive_some(64)):
        await stream.send_all(data)
async def main():
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    print(listener.socket.getsockname()[1], flush=True)
    await trio.serve_listeners(echo, [listener])
trio.run(main)
"""


def cpu_s(pid: int) -> float:
    """CPU seconds of a process's main thread (its trio loop), from /proc in nanoseconds."""
    with open(f"/proc/{pid}/schedstat") as fh:
        return int(fh.read().split()[0]) / 1e9


def minor_faults(pid: int) -> int:
    return int(_stat(pid)[7])


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()


def plain_tcp(gaps: list[float], calls: int) -> dict[float, tuple[float, float, float]]:
    """Median round trip (ms) and CPU per call (ms, client and server) of an 8-byte echo per gap."""
    peer = subprocess.Popen([sys.executable, "-c", _TCP_ECHO], stdout=subprocess.PIPE, text=True)
    assert peer.stdout is not None
    conn = socket.create_connection(("127.0.0.1", int(peer.stdout.readline())))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = {}
    try:
        for gap in gaps:
            samples = []
            c0, s0 = time.process_time(), cpu_s(peer.pid)
            for _ in range(calls):
                if gap:
                    time.sleep(gap)
                start = time.perf_counter()
                conn.sendall(b"x" * 8)
                conn.recv(64)
                samples.append(time.perf_counter() - start)
            c1, s1 = time.process_time(), cpu_s(peer.pid)
            out[gap] = (statistics.median(samples) * 1e3, (c1 - c0) * 1e3 / calls, (s1 - s0) * 1e3 / calls)
    finally:
        conn.close()
        peer.wait(10)
    return out


async def bare_trio(gaps: list[float], calls: int) -> dict[float, tuple[float, float, float]]:
    """The same 8-byte echo between two bare trio processes (no Noise, Yamux or RPC): the floor
    of a trio event loop waking up on each side."""
    peer = subprocess.Popen([sys.executable, "-c", _TRIO_ECHO], stdout=subprocess.PIPE, text=True)
    assert peer.stdout is not None
    out = {}
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", int(peer.stdout.readline()))
        for gap in gaps:
            samples = []
            c0, s0 = time.process_time(), cpu_s(peer.pid)
            for _ in range(calls):
                if gap:
                    await trio.sleep(gap)
                start = time.perf_counter()
                await stream.send_all(b"x" * 8)
                await stream.receive_some(64)
                samples.append(time.perf_counter() - start)
            c1, s1 = time.process_time(), cpu_s(peer.pid)
            out[gap] = (statistics.median(samples) * 1e3, (c1 - c0) * 1e3 / calls, (s1 - s0) * 1e3 / calls)
        await stream.aclose()
    finally:
        peer.kill()
        peer.wait(10)
    return out


async def ours(
    addr: str, server_pid: int, gaps: list[float], calls: int, profile: Path | None, tag: str
) -> dict[float, tuple[float, float, float]]:
    """The same with an embedded node calling the daemon over its fast lane."""
    out = {}
    config = NodeConfig(listen=("/ip4/127.0.0.1/tcp/0",), control=False, data_dir=Path(tempfile.mkdtemp()))
    async with Node(config) as node:
        await node.connect(addr)
        for _ in range(50):
            await node.rpc.call(addr, "lattice.bench.echo", b"x" * 8)
        for gap in gaps:
            spy = None
            if profile is not None:
                name = profile / f"server-{tag}-gap{gap * 1e3:g}.txt"
                cmd = [
                    "py-spy",
                    "record",
                    "--rate",
                    "2000",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "-o",
                    str(name),
                ]
                spy = subprocess.Popen([*cmd, "--pid", str(server_pid)], stdout=subprocess.DEVNULL)
                await trio.sleep(1.0)
            samples = []
            f0, g0 = minor_faults(os.getpid()), minor_faults(server_pid)
            c0, s0 = time.process_time(), cpu_s(server_pid)
            for _ in range(calls):
                if gap:
                    await trio.sleep(gap)
                start = time.perf_counter()
                await node.rpc.call(addr, "lattice.bench.echo", b"x" * 8)
                samples.append(time.perf_counter() - start)
            c1, s1 = time.process_time(), cpu_s(server_pid)
            faults = ((minor_faults(os.getpid()) - f0) / calls, (minor_faults(server_pid) - g0) / calls)
            if spy is not None:
                spy.send_signal(2)
                spy.wait(30)
            out[gap] = (
                statistics.median(samples) * 1e3,
                (c1 - c0) * 1e3 / calls,
                (s1 - s0) * 1e3 / calls,
                *faults,
            )
    return out


def concurrent_trees(trees: list[str], argv: list[str]) -> None:
    """Run this bench once per tree (PYTHONPATH=TREE/src), all at once; tag and echo their lines."""
    at = next(i for i, a in enumerate(argv) if a.startswith("--trees"))
    rest = argv[:at] + argv[at + (1 if "=" in argv[at] else 2) :]
    procs = []
    for tree in trees:
        env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve() / "src")}
        cmd = [sys.executable, str(Path(__file__).resolve()), *rest, "--no-tcp"]
        procs.append((tree, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)))
    for tree, proc in procs:
        out, _ = proc.communicate()
        for raw in out.splitlines():
            print(json.dumps({**json.loads(raw), "tree": tree}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=200, help="calls per gap and round")
    parser.add_argument("--gaps", default="0,10,40", help="idle gaps between calls, ms, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-tcp", action="store_true", help="skip the plain TCP and bare trio baselines")
    parser.add_argument("--profile", type=Path, help="record the daemon with py-spy into this directory")
    parser.add_argument(
        "--trees",
        help="comma-separated source trees (e.g. a base checkout's and this branch's): one run per tree, "
        "all at the same time (so they share the machine's load), each line tagged with its tree",
    )
    args = parser.parse_args()
    if args.trees:
        return concurrent_trees(args.trees.split(","), sys.argv[1:])
    gaps = [float(g) / 1e3 for g in args.gaps.split(",")]
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        daemon = start_daemon(Path(tmp), "b", ["--enable-bench", "--listen", "/ip4/127.0.0.1/tcp/0"])
        try:
            for rnd in range(args.rounds):
                got = trio.run(
                    ours, daemon.info["addrs"][0], daemon.proc.pid, gaps, args.calls, args.profile, str(rnd)
                )
                tcp = {} if args.no_tcp else plain_tcp(gaps, args.calls)
                floor = {} if args.no_tcp else trio.run(bare_trio, gaps, args.calls)
                load = os.getloadavg()[0]
                for gap in gaps:
                    ms, cpu_c, cpu_s_, flt_c, flt_s = got[gap]
                    line = {"bench": "call_gap", "round": rnd, "gap_ms": gap * 1e3, "calls": args.calls,
                            "ours_ms": round(ms, 4), "cpu_client_ms": round(cpu_c, 4),
                            "cpu_server_ms": round(cpu_s_, 4), "faults_client": round(flt_c, 2),
                            "faults_server": round(flt_s, 2), "load": round(load, 2)}  # fmt: skip
                    if gap in tcp:
                        line.update(tcp_ms=round(tcp[gap][0], 4), extra_ms=round(ms - tcp[gap][0], 4))
                        line.update(trio_ms=round(floor[gap][0], 4))
                        line.update(cpu_trio_server_ms=round(floor[gap][2], 4))
                    print(json.dumps(line), flush=True)
        finally:
            daemon.stop()


if __name__ == "__main__":
    main()
