"""Start N peer processes on 127.0.0.1 (for tests and benchmarks): the first one is the bootstrap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def start_peers(
    n: int,
    run: str,
    out: Path,
    args: list[str],
    extra: dict[int, list[str]] | None = None,
    timeout: float = 30.0,
    command: list[str] | None = None,
) -> list[subprocess.Popen]:
    """Peer i writes to ``out/peer<i>``; returns the processes (the caller waits or kills them).
    ``command``: what starts one peer (default ``python -m lattice.apps.gossip_sgd peer``); it gets
    the peer options (--run, --peers, --out, --addr-file or --bootstrap, ``args``) appended."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = command or [sys.executable, "-m", "lattice.apps.gossip_sgd", "peer"]
    base = [*command, "--run", run, "--peers", str(n), *args]
    addr_file = out / "bootstrap.addr"
    addr_file.unlink(missing_ok=True)
    procs = []

    def spawn(i: int, more: list[str]) -> subprocess.Popen:
        d = out / f"peer{i}"
        d.mkdir(parents=True, exist_ok=True)
        cmd = [*base, "--out", str(d), *more, *(extra or {}).get(i, [])]
        return subprocess.Popen(cmd, env=env, stdout=open(d / "stdout", "w"), stderr=open(d / "stderr", "w"))

    procs.append(spawn(0, ["--addr-file", str(addr_file)]))
    deadline = time.monotonic() + timeout
    while not addr_file.exists():
        if time.monotonic() > deadline or procs[0].poll() is not None:
            for p in procs:
                p.kill()
            raise RuntimeError(
                f"bootstrap peer did not start: {(out / 'peer0' / 'stderr').read_text()[-2000:]}"
            )
        time.sleep(0.05)
    addr = addr_file.read_text().strip()
    for i in range(1, n):
        procs.append(spawn(i, ["--bootstrap", addr]))
    return procs


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return out
