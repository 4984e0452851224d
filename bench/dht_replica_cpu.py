"""bench/dht_replica_cpu: CPU per put split by role, the putter vs each replica.

    python bench/dht_replica_cpu.py [--nodes 16] [--puts 200] [--runs 5]

All puts go through daemon 0's control socket; with nodes <= k (20) every other daemon is a replica
of every put. Reported (medians of --runs): `putter_cpu_us` (daemon 0 per put: lookup, signing,
fan-out, control socket), `replica_cpu_us` and `replica_sys_us` (daemons 1.. summed, per put and
replica: PUT_VALUE handling plus its share of the 3 lookup queries), and `calib_ms` as in
bench/cpu_per_op.py (the baseline: how fast this CPU runs Python right now). Less noisy than the
whole-swarm figure of cpu_per_op.py because a role's CPU is divided by its own work.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, start_dht_swarm, stop
from cpu_per_op import calibrate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--puts", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not 2 <= args.nodes <= 20:
        parser.error("--nodes must be 2..20 (every daemon a replica)")
    flags = ("--reachability", "public")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        procs, clients = start_dht_swarm(
            work, args.nodes, *flags, want=args.nodes - 1, timeout=30, client_timeout=60
        )
        try:
            ps = [psutil.Process(p.pid) for p in procs]
            putter = clients[0]
            for i in range(100):  # warm-up: connections, streams, caches
                putter.dht.put(f"warm/{i}", b"w", ttl=600)
            replicas = args.nodes - 1
            put_us, rep_us, rep_sys, calib = [], [], [], [calibrate()]
            for run in range(args.runs):
                before = [p.cpu_times() for p in ps]
                for i in range(args.puts):
                    putter.dht.put(f"cpu/{run}/{i}", b"x" * 32, ttl=600)
                after = [p.cpu_times() for p in ps]
                d_user = [b.user - a.user for a, b in zip(before, after, strict=True)]
                d_sys = [b.system - a.system for a, b in zip(before, after, strict=True)]
                put_us.append((d_user[0] + d_sys[0]) * 1e6 / args.puts)
                rep_us.append((sum(d_user[1:]) + sum(d_sys[1:])) * 1e6 / (args.puts * replicas))
                rep_sys.append(sum(d_sys[1:]) * 1e6 / (args.puts * replicas))
                calib.append(calibrate())
            extra = {"nodes": args.nodes, "puts": args.puts, "replicas": replicas}
            emit("cpu", "lattice", "putter_cpu_us", put_us, **extra)
            emit("cpu", "lattice", "replica_cpu_us", rep_us, **extra)
            emit("cpu", "lattice", "replica_sys_us", rep_sys, **extra)
            emit("cpu", "python-loop", "calib_ms", calib, note="1e6 additions; lower = faster CPU right now")
            for c in clients:
                c.close()
        finally:
            for p in procs:
                stop(p)


if __name__ == "__main__":
    main()
