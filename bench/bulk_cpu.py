"""bench/bulk_cpu: CPU milliseconds per MiB of tensor moved between two daemons (Noise + Yamux + RPC).

    python bench/bulk_cpu.py [--runs 5] [--count 4]

The figure that survives a contended machine for the large-tensor path (issue 3's 64 MiB up/down and
1 MiB up): CPU (user + sys, psutil) of both daemons over ``count`` calls, divided by the MiB moved.
Baseline in the same run: the same bytes over plain TCP between two processes (kernel loopback
only, no encryption), and ``calib_ms`` (a fixed pure-Python loop) between the runs. Compare old and
new code by running this alternately with PYTHONPATH pointing at each tree.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, start_daemon, stop
from cpu_per_op import calibrate, cpu_s

from lattice import Client

CASES = [("up", 64 << 20), ("down", 64 << 20), ("up", 1 << 20)]

_TCP = r"""
import os, socket, sys
mib, count = int(sys.argv[1]), int(sys.argv[2])
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
pid = os.fork()
if pid == 0:
    c = socket.create_connection(srv.getsockname()); buf = bytearray(1 << 20)
    for _ in range(mib * count):
        c.sendall(buf)
    c.close(); os._exit(0)
s, _ = srv.accept(); view = memoryview(bytearray(1 << 20)); got = 0
start = os.times()
while (n := s.recv_into(view)):
    got += n
os.waitpid(pid, 0)
t = os.times()
assert got == mib * count << 20
print(t.user + t.system + t.children_user + t.children_system - start.user - start.system)
"""


def tcp_ms_per_mib(mib: int, count: int) -> float:
    """CPU ms per MiB of both ends of a plain loopback TCP transfer (1 MiB writes and reads)."""
    out = subprocess.run([sys.executable, "-c", _TCP, str(mib), str(count)], capture_output=True, timeout=120)
    return float(out.stdout) * 1000 / (mib * count)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--count", type=int, default=4, help="calls per run (64 MiB cases; 1 MiB: x16)")
    args = parser.parse_args()
    calib = [calibrate()]
    with tempfile.TemporaryDirectory() as tmp:
        a, a_info, _ = start_daemon(Path(tmp), "a", "--enable-bench")
        b, b_info, _ = start_daemon(Path(tmp), "b", "--enable-bench")
        try:
            procs = [psutil.Process(a.pid), psutil.Process(b.pid)]
            with Client(a_info["control"], timeout=600) as client:
                peer = b_info["addrs"][0]
                client.connect(peer)
                for direction, size in CASES:
                    count = args.count if size >= 16 << 20 else args.count * 16
                    client.rpc.bench(peer, size, count=1, direction=direction)  # warm-up
                    runs, walls = [], []
                    for _ in range(args.runs):
                        before = cpu_s(procs)
                        res = client.rpc.bench(peer, size, count=count, direction=direction)
                        runs.append((cpu_s(procs) - before) * 1000 / (count * size / 2**20))
                        walls.append(res["mib_per_s"])
                    calib.append(calibrate())
                    emit(
                        "bulk_cpu",
                        "lattice",
                        f"rpc_{direction}_{size >> 20}mib_cpu_ms_per_mib",
                        runs,
                        processes=2,
                        wall_mib_s_median=round(sorted(walls)[len(walls) // 2], 1),
                    )
        finally:
            stop(a)
            stop(b)
    emit(
        "bulk_cpu",
        "plain-tcp",
        "tcp_cpu_ms_per_mib",
        [tcp_ms_per_mib(64, args.count) for _ in range(args.runs)],
    )
    emit("bulk_cpu", "python-loop", "calib_ms", calib, note="1e6 additions; lower = faster CPU right now")


if __name__ == "__main__":
    main()
