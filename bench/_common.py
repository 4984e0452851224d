"""Shared bench helpers: JSON-line output, daemons as real processes, memory from /proc."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path


def emit(bench: str, system: str, metric: str, runs: list[float], **extra) -> dict:
    line = {
        "bench": bench,
        "system": system,
        "metric": metric,
        "median": round(statistics.median(runs), 4),
        "runs": [round(r, 4) for r in runs],
        **extra,
    }
    print(json.dumps(line), flush=True)
    return line


def tree_rss_mib(pid: int) -> float:
    """RSS of a process and its descendants, from /proc (no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    total_pages, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as fh:
                total_pages += int(fh.read().split()[1])
        except OSError:
            continue
        stack.extend(children.get(p, []))
    return total_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def proc_status_mib(pid: int, field: str) -> float:
    """A /proc/PID/status memory field (VmRSS, VmHWM) in MiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def start_daemon(workdir: Path, name: str, *extra: str) -> tuple[subprocess.Popen, dict, float]:
    """Start `lattice-node run` on 127.0.0.1; return (process, ready info, seconds to ready)."""
    ready = workdir / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
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
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = start + 30
    while not ready.exists():
        if proc.poll() is not None or time.perf_counter() > deadline:
            proc.kill()
            raise RuntimeError(f"{name} did not become ready")
        time.sleep(0.002)
    elapsed = time.perf_counter() - start
    return proc, json.loads(ready.read_text()), elapsed


def start_dht_swarm(
    workdir: Path, nodes: int, *flags: str, want: int, timeout: float, client_timeout: float
) -> tuple[list[subprocess.Popen], list]:
    """Start ``nodes`` daemons around the first one (their bootstrap), 4 at a time, and wait (at most
    ``timeout`` s) until every routing table holds ``want`` peers; returns (processes, clients)."""
    from concurrent.futures import ThreadPoolExecutor

    from lattice import Client

    first, first_info, _ = start_daemon(workdir, "n0", *flags)
    boot = first_info["addrs"][0]
    with ThreadPoolExecutor(4) as pool:
        started = list(
            pool.map(lambda i: start_daemon(workdir, f"n{i}", "--bootstrap", boot, *flags), range(1, nodes))
        )
    procs = [first] + [p for p, _, _ in started]
    clients = [
        Client(i["control"], timeout=client_timeout) for i in [first_info] + [i for _, i, _ in started]
    ]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if min(c.dht.status()["routing_table"] for c in clients) >= want:
            break
        time.sleep(0.2)
    return procs, clients


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def relay_anchor_lines(driver: Path, runs: int, timeout: float = 1800) -> list[dict]:
    """Run an anchors driver (bench/anchors/run_*.py) and echo + return its JSON lines."""
    if not driver.exists():
        print(json.dumps({"error": f"{driver} missing"}), flush=True)
        return []
    out = subprocess.run(
        [sys.executable, str(driver), "--runs", str(runs)], capture_output=True, text=True, timeout=timeout
    )
    lines = []
    for raw in out.stdout.splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        print(json.dumps(line), flush=True)
        lines.append(line)
    if out.returncode != 0:
        print(json.dumps({"error": f"{driver.name} failed: {out.stderr[-500:]}"}), flush=True)
    return lines


def ratio(bench: str, metric: str, ours: float, anchor: str, theirs: float, higher_is_better: bool) -> None:
    """One line: how many times better we are than an anchor on a metric (> 1 = we win)."""
    if not ours or not theirs:
        return
    times_better = ours / theirs if higher_is_better else theirs / ours
    print(
        json.dumps(
            {
                "bench": bench,
                "metric": metric,
                "vs": anchor,
                "lattice": round(ours, 4),
                "anchor": round(theirs, 4),
                "times_better": round(times_better, 2),
            }
        ),
        flush=True,
    )
