"""bench/startup: process start to ready, and idle RSS, of one daemon; anchors in the same run.

    python bench/startup.py [--runs 5] [--no-anchors]

Prints one JSON line per figure: {"bench": "startup", "system": ..., "metric": ..., "median": ...,
"runs": [...]}. "ready" is the wall time from spawning the process until it can serve a request
(for lattice-node: its ready file exists, written after the listeners and the control socket are up);
"ready_cpu_s" the CPU time (every thread) it used until then, which other jobs on the cores do not
inflate as they inflate wall time.
Baselines in the same run: a bare `python -c pass` (the interpreter's own floor) and `python -c
"import trio"` (the event loop every lattice node needs: what start-up cannot go below).
Anchors (Lattica, hivemind) run through bench/anchors/run_startup.py when their venvs exist.

lattice's modules are byte-compiled first, as `pip install` does: where PYTHONDONTWRITEBYTECODE is set
(this VM sets it) an editable checkout would otherwise recompile every module at every start (about
0.25 s), which no installed node pays. The "bytecode" field says whether that worked.
"""

from __future__ import annotations

import argparse
import compileall
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import emit as _emit  # noqa: E402
from _common import start_daemon, stop, tree_rss_mib  # noqa: E402
from anchors._common import tree_cpu_s  # noqa: E402


def emit(system: str, metric: str, runs: list[float], **extra) -> dict:
    return _emit("startup", system, metric, runs, **extra)


def one_lattice_run(workdir: Path, idle_s: float) -> tuple[float, float, float]:
    """Seconds from spawn to ready, CPU seconds used until then, and RSS after ``idle_s`` seconds
    idle, of one daemon."""
    proc, _, ready_s = start_daemon(workdir, "data")
    try:
        cpu_s = tree_cpu_s(proc.pid)
        time.sleep(idle_s)
        rss = tree_rss_mib(proc.pid)
    finally:
        stop(proc)
    return ready_s, cpu_s, rss


def python_floor(code: str = "pass") -> tuple[float, float]:
    """Wall and CPU seconds of ``python -c code``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def emit_floor(system: str, code: str, runs: int) -> None:
    walls, cpus = zip(*[python_floor(code) for _ in range(runs)], strict=True)
    emit(system, "ready_s", list(walls))
    emit(system, "ready_cpu_s", list(cpus))


def compile_lattice() -> str:
    """Byte-compile the lattice package the daemon will import (what pip does at install)."""
    where = subprocess.run(
        [sys.executable, "-c", "import lattice, os; print(os.path.dirname(lattice.__file__))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    return "compiled" if compileall.compile_dir(where, quiet=1) else f"not compiled ({where} not writable?)"


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--idle", type=float, default=2.0, help="seconds idle before reading RSS")
    parser.add_argument("--no-anchors", action="store_true")
    args = parser.parse_args()

    bytecode = compile_lattice()
    emit_floor("python -c pass", "pass", args.runs)
    emit_floor("python -c 'import trio'", "import trio", args.runs)
    ready, cpu, rss = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):  # same data dir: a restart with an existing key, as in real use
            r, c, m = one_lattice_run(Path(tmp), args.idle)
            ready.append(r)
            cpu.append(c)
            rss.append(m)
    ours = {
        "ready_s": emit("lattice", "ready_s", ready, target="<= 1.0", bytecode=bytecode),
        "ready_cpu_s": emit("lattice", "ready_cpu_s", cpu),
        "idle_rss_mib": emit("lattice", "idle_rss_mib", rss, target="<= 100"),
    }

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
        if "median" in line and line.get("metric") in ours:
            mine = ours[line["metric"]]
            ratio = line["median"] / mine["median"] if mine["median"] else None
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
