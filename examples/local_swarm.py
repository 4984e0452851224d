"""A local swarm in one command: N `lattice-node` daemons on 127.0.0.1 that find each other.

    python examples/local_swarm.py --nodes 4

Starts the daemons (real processes), lets them join through the first one (bootstrap), then drives
them from this process with `lattice.Client`: peers, pings, status. Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lattice import Client


def start(workdir: Path, name: str, bootstrap: str | None) -> tuple[subprocess.Popen, dict]:
    ready = workdir / f"{name}.ready.json"
    cmd = [
        sys.executable,
        "-m",
        "lattice.cli",
        "run",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--data-dir",
        str(workdir / name),
        "--ready-file",
        str(ready),
        "--log-level",
        "warning",
    ]
    if bootstrap:
        cmd += ["--bootstrap", bootstrap]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{name} failed to start")
        time.sleep(0.02)
    return proc, json.loads(ready.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=4, help="number of daemons (default 4)")
    parser.add_argument("--keep", action="store_true", help="keep running until Ctrl-C")
    args = parser.parse_args()
    if not 2 <= args.nodes <= 64:
        parser.error("--nodes must be between 2 and 64")
    workdir = Path(tempfile.mkdtemp(prefix="lattice-swarm-"))
    procs: list[subprocess.Popen] = []
    try:
        t0 = time.monotonic()
        proc, boot = start(workdir, "node0", None)
        procs.append(proc)
        infos = [boot]
        for i in range(1, args.nodes):
            proc, info = start(workdir, f"node{i}", boot["addrs"][0])
            procs.append(proc)
            infos.append(info)
        print(f"{args.nodes} daemons ready in {time.monotonic() - t0:.2f}s (state in {workdir})")
        with Client(boot["control"]) as client:
            deadline = time.monotonic() + 10
            while len(client.peers()) < args.nodes - 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            print(f"bootstrap {boot['peer_id']} sees {len(client.peers())} peers")
        for info in infos[1:]:
            with Client(info["control"]) as client:
                rtts = client.ping(boot["peer_id"], count=5)
                median = sorted(rtts)[len(rtts) // 2] * 1000
                print(f"  {info['peer_id']} -> bootstrap: ping median {median:.3f} ms")
        if args.keep:
            print("control sockets:")
            for info in infos:
                print(f"  lattice-node status --control {info['control']}")
            print("Ctrl-C to stop")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        print("all daemons stopped")


if __name__ == "__main__":
    main()
