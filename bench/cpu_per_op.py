"""bench/cpu_per_op: CPU microseconds per operation, a figure that survives a contended machine.

    python bench/cpu_per_op.py [--runs 5] [--calls 2000] [--nodes 16] [--puts 100] [--no-dht]

Wall-clock times on a VM shared with other jobs mostly measure the other jobs; the CPU a process
spends (user + sys, from psutil) on a fixed amount of work does not. Figures (one JSON line each,
medians of --runs):
- rpc_echo_cpu_us: an 8-byte echo over the fast lane between two daemons (`rpc.bench`, timed loop
  inside daemon A), CPU of both daemons divided by the number of calls;
- dht_put_cpu_us: a put (replicated to the closest peers) through a random daemon's control socket,
  CPU of the whole swarm divided by the number of puts;
- baselines in the same run: the same daemons' idle CPU over the same wall time (background loops),
  a control-socket round trip (`id`) per op, an 8-byte echo over plain TCP between two processes, and
  `calib_ms`, the CPU time of a fixed pure-Python loop (contention slows even CPU time: shared caches,
  SMT siblings), measured between the runs so figures can be compared as ratios to it.
"""

from __future__ import annotations

import argparse
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, start_daemon, start_dht_swarm, stop

from lattice import Client

_TCP_ECHO = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while (b := s.recv(64)):
    s.sendall(b)
"""


def cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        t = p.cpu_times()
        total += t.user + t.system
    return total


def measure(procs: list[psutil.Process], work, ops: int) -> tuple[float, float]:
    """(CPU us per op, wall s) of ``work()`` over ``procs``."""
    before, start = cpu_s(procs), time.perf_counter()
    work()
    wall = time.perf_counter() - start
    return (cpu_s(procs) - before) * 1e6 / ops, wall


def idle_us(procs: list[psutil.Process], wall: float, ops: int) -> float:
    before = cpu_s(procs)
    time.sleep(wall)
    return (cpu_s(procs) - before) * 1e6 / ops


def calibrate() -> float:
    """CPU ms of a fixed pure-Python workload (how fast this CPU runs Python right now)."""
    start = time.process_time()
    total = 0
    for i in range(1_000_000):
        total += i
    return (time.process_time() - start) * 1000


def tcp_echo(calls: int) -> float:
    """CPU us per 8-byte echo round trip over plain TCP, both processes."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        peer = subprocess.Popen([sys.executable, "-c", _TCP_ECHO, str(srv.getsockname()[1])])
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        procs = [psutil.Process(), psutil.Process(peer.pid)]

        def work() -> None:
            for _ in range(calls):
                conn.sendall(b"12345678")
                conn.recv(64)

        us, _ = measure(procs, work, calls)
        conn.close()
        peer.wait(10)
    return us


def rpc(work_dir: Path, runs: int, calls: int) -> None:
    a, a_info, _ = start_daemon(work_dir, "a", "--enable-bench")
    b, b_info, _ = start_daemon(work_dir, "b", "--enable-bench")
    try:
        procs = [psutil.Process(a.pid), psutil.Process(b.pid)]
        with Client(a_info["control"], timeout=600) as client:
            peer = b_info["addrs"][0]
            client.connect(peer)
            client.rpc.bench(peer, 8, count=calls, direction="echo")  # warm-up
            per_call, idle = [], []
            for _ in range(runs):
                us, wall = measure(
                    procs, lambda: client.rpc.bench(peer, 8, count=calls, direction="echo"), calls
                )
                per_call.append(us)
                idle.append(idle_us(procs, min(wall, 2.0), calls) * wall / min(wall, 2.0))
        emit("cpu", "lattice", "rpc_echo_cpu_us", per_call, calls=calls, processes=2, target_wall_ms=0.3)
        emit("cpu", "lattice", "rpc_idle_cpu_us_same_wall", idle, note="background loops, per call")
    finally:
        stop(a)
        stop(b)
    emit("cpu", "plain-tcp", "tcp_echo_cpu_us", [tcp_echo(calls) for _ in range(runs)], calls=calls)


def dht(work_dir: Path, runs: int, nodes: int, puts: int) -> None:
    rng = random.Random(0)
    procs, clients = start_dht_swarm(work_dir, nodes, want=min(nodes - 1, 20), timeout=60, client_timeout=120)
    try:
        ps = [psutil.Process(p.pid) for p in procs]
        for i in range(puts):  # warm-up: every connection made, every page in cache
            rng.choice(clients).dht.put(f"warm/{i}", b"w", ttl=600)
        per_put, idle, ctl = [], [], []
        for run in range(runs):
            keys = [f"cpu/{run}/{i}" for i in range(puts)]
            chosen = [rng.choice(clients) for _ in keys]

            def work(keys=keys, chosen=chosen) -> None:
                for key, client in zip(keys, chosen, strict=True):
                    client.dht.put(key, key.encode(), ttl=600)

            us, wall = measure(ps, work, puts)
            per_put.append(us)
            idle.append(idle_us(ps, min(wall, 2.0), puts) * wall / min(wall, 2.0))
            ctl.append(measure(ps, lambda chosen=chosen: [c.id() for c in chosen], puts)[0])
        emit("cpu", "lattice", "dht_put_cpu_us", per_put, nodes=nodes, puts=puts, processes=nodes)
        emit("cpu", "lattice", "dht_idle_cpu_us_same_wall", idle, note="background loops, per put")
        emit("cpu", "lattice", "control_rtt_cpu_us", ctl, note="one control-socket op, whole swarm")
        for c in clients:
            c.close()
    finally:
        for p in procs:
            stop(p)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--puts", type=int, default=100)
    parser.add_argument("--no-rpc", action="store_true")
    parser.add_argument("--no-dht", action="store_true")
    args = parser.parse_args()
    calib = [calibrate()]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_rpc:
            rpc(Path(tmp), args.runs, args.calls)
            calib.append(calibrate())
        if not args.no_dht:
            dht(Path(tmp), args.runs, args.nodes, args.puts)
            calib.append(calibrate())
    calib += [calibrate() for _ in range(2)]
    emit("cpu", "python-loop", "calib_ms", calib, note="1e6 additions; lower = faster CPU right now")


if __name__ == "__main__":
    main()
