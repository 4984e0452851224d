"""bench/startup: process start to ready, and idle RSS, of one daemon; anchors in the same run.

    python bench/startup.py [--runs 5] [--no-anchors]

Prints one JSON line per figure: {"bench": "startup", "system": ..., "metric": ..., "median": ...,
"runs": [...]}. "ready" is the wall time from spawning the process until it can serve a request
(for lattice-node: its ready file exists, written after the listeners and the control socket are up).
Baseline in the same run: a bare `python -c pass` (the interpreter's own floor).
Anchors (Lattica, hivemind) run through bench/anchors/run_startup.py when their venvs exist.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import emit as _emit  # noqa: E402
from _common import start_daemon, stop, tree_rss_mib  # noqa: E402


def emit(system: str, metric: str, runs: list[float], **extra) -> dict:
    return _emit("startup", system, metric, runs, **extra)


def one_lattice_run(workdir: Path, idle_s: float) -> tuple[float, float]:
    """Seconds from spawn to ready, and RSS after ``idle_s`` seconds idle, of one daemon."""
    proc, _, ready_s = start_daemon(workdir, "data")
    try:
        time.sleep(idle_s)
        rss = tree_rss_mib(proc.pid)
    finally:
        stop(proc)
    return ready_s, rss


def python_floor() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--idle", type=float, default=2.0, help="seconds idle before reading RSS")
    parser.add_argument("--no-anchors", action="store_true")
    args = parser.parse_args()

    floor = [python_floor() for _ in range(args.runs)]
    emit("python -c pass", "ready_s", floor)
    ready, rss = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):  # same data dir: a restart with an existing key, as in real use
            r, m = one_lattice_run(Path(tmp), args.idle)
            ready.append(r)
            rss.append(m)
    ours_ready = emit("lattice", "ready_s", ready, target="<= 1.0")
    ours_rss = emit("lattice", "idle_rss_mib", rss, target="<= 100")

    if args.no_anchors:
        return
    driver = HERE / "anchors" / "run_startup.py"
    if not driver.exists():
        print(json.dumps({"bench": "startup", "error": "bench/anchors/run_startup.py missing"}))
        return
    out = subprocess.run(
        [sys.executable, str(driver), "--runs", str(args.runs)], capture_output=True, text=True, timeout=1800
    )
    for raw in out.stdout.splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        print(json.dumps(line), flush=True)
        if "median" in line and line.get("metric") in ("ready_s", "idle_rss_mib"):
            ours = ours_ready if line["metric"] == "ready_s" else ours_rss
            ratio = line["median"] / ours["median"] if ours["median"] else None
            print(
                json.dumps(
                    {
                        "bench": "startup",
                        "metric": f"{line['metric']}_ratio",
                        "anchor": line["system"],
                        "anchor_over_lattice": round(ratio, 2) if ratio else None,
                    }
                ),
                flush=True,
            )
    if out.returncode != 0:
        print(json.dumps({"bench": "startup", "error": f"anchor driver failed: {out.stderr[-500:]}"}))


if __name__ == "__main__":
    main()
