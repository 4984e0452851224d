"""bench/rpc: tensor RPC between two `lattice-node` daemons; plain TCP and the anchors in the same run.

    python bench/rpc.py [--runs 5] [--no-anchors] [--no-gib]

Figures (one JSON line each, medians of --runs): 64 MiB and 1 MiB float32 tensors client->server
("up") and server->client ("down") in MiB/s per call; small unary round trip in ms; 1,000 concurrent
small calls; receiver peak RSS above idle while receiving a 1 GiB tensor. Our calls are timed inside
daemon A (control API `rpc.bench`), so the control socket is not in the figures. Encrypted and
authenticated (Noise) and checksummed, as always.
Baselines: plain TCP between two processes (64 MiB one way; 8-byte echo round trip), same machine.
Anchors: bench/anchors/run_rpc.py (Lattica, hivemind), each in its own network namespace.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, proc_status_mib, ratio, relay_anchor_lines, start_daemon, stop

from lattice import Client

HERE = Path(__file__).resolve().parent
MIB = 1 << 20

_TCP_PEER = r"""
import socket, sys
mode, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if mode == "sink":
    buf = bytearray(1 << 22); view = memoryview(buf)
    while s.recv_into(view): pass
else:
    while (b := s.recv(64)):
        s.sendall(b)
"""


def plain_tcp(runs: int) -> tuple[list[float], list[float]]:
    """64 MiB one way (MiB/s) and 8-byte echo round trips (ms) between two processes."""
    data = bytes(64 * MIB)
    speeds, rtts = [], []
    for _ in range(runs):
        with socket.create_server(("127.0.0.1", 0)) as srv:
            peer = subprocess.Popen([sys.executable, "-c", _TCP_PEER, "sink", str(srv.getsockname()[1])])
            conn, _ = srv.accept()
            start = time.perf_counter()
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            peer.wait(30)
            speeds.append(64 / (time.perf_counter() - start))
            conn.close()
    with socket.create_server(("127.0.0.1", 0)) as srv:
        peer = subprocess.Popen([sys.executable, "-c", _TCP_PEER, "echo", str(srv.getsockname()[1])])
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        samples = []
        for _ in range(1000):
            start = time.perf_counter()
            conn.sendall(b"12345678")
            conn.recv(64)
            samples.append((time.perf_counter() - start) * 1000)
        conn.close()
        peer.wait(10)
        rtts.append(statistics.median(samples))
    return speeds, rtts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-anchors", action="store_true")
    parser.add_argument("--no-gib", action="store_true", help="skip the 1 GiB memory measurement")
    args = parser.parse_args()
    ours: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # a budget that admits the 1 GiB message whatever the machine's RAM (a peer may hold a quarter)
        a, a_info, _ = start_daemon(work, "a", "--enable-bench", "--max-memory", "8GiB")
        b, b_info, _ = start_daemon(work, "b", "--enable-bench", "--max-memory", "8GiB")
        try:
            with Client(a_info["control"], timeout=600) as client:
                peer = b_info["addrs"][0]
                client.connect(peer)
                for size, label in ((64 * MIB, "64mib"), (MIB, "1mib")):
                    count = args.runs if size > MIB else max(args.runs, 20)
                    for direction in ("up", "down"):
                        r = client.rpc.bench(peer, size, count=count, direction=direction)
                        speeds = [size / MIB / t for t in r["times_s"]]
                        line = emit("rpc", "lattice", f"{direction}_{label}_mibs", speeds)
                        ours[line["metric"]] = line["median"]
                rtts = []  # median of each batch of 400 calls: medians of >= 5 runs
                for _ in range(args.runs):
                    rtt = client.rpc.bench(peer, 8, count=400, direction="echo")
                    rtts.append(rtt["median_s"] * 1000)
                ours["rtt_ms"] = emit("rpc", "lattice", "rtt_ms", rtts, target="<= 0.3")["median"]
                conc = client.rpc.bench(peer, 8, count=args.runs, direction="echo", concurrency=1000)
                emit(
                    "rpc",
                    "lattice",
                    "concurrent_1000_calls_per_s",
                    [conc["calls_per_s"]],
                    calls=conc["calls"],
                )
                if not args.no_gib:
                    idle = proc_status_mib(b.pid, "VmRSS")
                    client.rpc.bench(peer, 1 << 30, count=1, direction="up")
                    peak = proc_status_mib(b.pid, "VmHWM")
                    emit(
                        "rpc",
                        "lattice",
                        "recv_1gib_peak_rss_above_idle_mib",
                        [peak - idle],
                        target="<= 1536",
                        idle_mib=round(idle, 1),
                    )
        finally:
            stop(a)
            stop(b)
    speeds, rtts = plain_tcp(args.runs)
    tcp_speed = emit("rpc", "plain-tcp", "up_64mib_mibs", speeds, note="unencrypted, no framing")["median"]
    tcp_rtt = emit("rpc", "plain-tcp", "rtt_ms", rtts)["median"]
    print(
        json.dumps(
            {
                "bench": "rpc",
                "metric": "fraction_of_plain_tcp",
                "up_64mib": round(ours["up_64mib_mibs"] / tcp_speed, 3),
                "rtt_overhead_ms": round(ours["rtt_ms"] - tcp_rtt, 4),
            }
        ),
        flush=True,
    )
    if args.no_anchors:
        return
    for line in relay_anchor_lines(HERE / "anchors" / "run_rpc.py", args.runs):
        metric, theirs = line.get("metric"), line.get("median")
        if metric in ours and theirs:
            ratio("rpc", metric, ours[metric], line["system"], theirs, higher_is_better=metric != "rtt_ms")


if __name__ == "__main__":
    main()
