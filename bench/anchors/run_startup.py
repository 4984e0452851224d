"""bench/anchors/run_startup: start-up time and idle memory of the anchor systems (Lattica, hivemind).

    python bench/anchors/run_startup.py [--runs 5] [--idle 2.0] [--systems lattica,hivemind]

Stdlib only. The venvs come from bench/anchors/setup.sh, under $LATTICE_ANCHOR_DIR
(default ~/.cache/lattice-anchors). Each run spawns one node in a fresh network namespace holding
only loopback (`unshare -n`, needs root): Lattica probes public STUN servers at start-up, and
hivemind's p2pd would otherwise look for NAT gateways.

ready_s is wall time from spawning the process until the node is ready (the script writes a byte to
the pipe passed in ANCHOR_READY_FD after its listener answered a libp2p negotiation); it includes
the namespace set-up (unshare + `ip link set lo up`, reported as netns_setup_s). ready_cpu_s is the CPU
time (all threads, the whole process tree) used until then: unlike wall time, it does not grow when
other jobs share the cores. idle_rss_mib is the
summed RSS of the node's whole process tree after --idle seconds (PSS median given beside it).

Prints one JSON line per figure:
    {"bench": "startup", "system": ..., "metric": "ready_s" | "ready_cpu_s" | "idle_rss_mib", "median": ...,
     "runs": [...]}
and {"bench": "startup", "system": ..., "error": ...} for an anchor that is missing or failed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import tree_cpu_s  # noqa: E402

ANCHOR_DIR = Path(os.environ.get("LATTICE_ANCHOR_DIR", Path.home() / ".cache" / "lattice-anchors"))
SYSTEMS = {
    # name: (venv dir, script, distribution whose version is reported)
    "lattica": (".venv-lattica", "startup_lattica.py", "lattica"),
    "hivemind": (".venv-hivemind", "startup_hivemind.py", "hivemind"),
}
NETNS = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']
READY_TIMEOUT_S = 120.0


def out(line: dict) -> None:
    print(json.dumps(line), flush=True)


def dist_version(venv: Path, dist: str) -> str | None:
    hits = glob.glob(str(venv / "lib" / "python*" / "site-packages" / f"{dist}-*.dist-info"))
    return Path(hits[0]).name[len(dist) + 1 : -len(".dist-info")] if hits else None


def netns_ok() -> str | None:
    """None if a loopback-only namespace can be made here, else why not."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare or ip (util-linux, iproute2) not found"
    try:
        r = subprocess.run([*NETNS, "true"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "unshare -n timed out"
    return None if r.returncode == 0 else f"unshare -n failed (root needed): {r.stderr.strip()[-200:]}"


def netns_setup_s() -> float:
    t = time.perf_counter()
    subprocess.run([*NETNS, "true"], check=True, timeout=10)
    return time.perf_counter() - t


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def one_run(python: Path, script: Path, data_dir: str, idle: float) -> dict:
    """Spawn one node; return its JSON line with ready_s replaced by the wall time measured here."""
    r, w = os.pipe()
    env = dict(os.environ, ANCHOR_READY_FD=str(w), PYTHONUNBUFFERED="1")
    with tempfile.TemporaryFile() as err:
        cmd = [*NETNS, str(python), str(script), "--data-dir", data_dir, "--idle", str(idle)]
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, env=env, pass_fds=(w,), start_new_session=True
        )
        os.close(w)
        try:
            ready, _, _ = select.select([r], [], [], READY_TIMEOUT_S)
            got = os.read(r, 1) if ready else b""
            ready_wall = time.perf_counter() - start
            ready_cpu = tree_cpu_s(proc.pid)
            if got != b"R":
                kill_group(proc)
                err.seek(0)
                tail = err.read().decode(errors="replace")[-600:]
                raise RuntimeError(f"not ready ({'timeout' if not ready else 'exited'}): {tail}")
            stdout, _ = proc.communicate(timeout=idle + 60)
        except BaseException:
            kill_group(proc)
            raise
        finally:
            os.close(r)
        err.seek(0)
        err_tail = err.read().decode(errors="replace")[-600:]
    kill_group(proc)  # nothing should be left; make sure of it
    lines = [ln for ln in stdout.decode(errors="replace").splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or len(lines) != 1:
        raise RuntimeError(f"exit {proc.returncode}, {len(lines)} JSON lines: {err_tail}")
    line = json.loads(lines[0])
    line["ready_s_self"] = line.pop("ready_s")
    line["ready_s"] = ready_wall
    line["ready_cpu_s"] = ready_cpu
    return line


def median_line(system: str, metric: str, runs: list[float], **extra) -> dict:
    return {
        "bench": "startup",
        "system": system,
        "metric": metric,
        "median": round(statistics.median(runs), 4),
        "runs": [round(x, 4) for x in runs],
        **extra,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--idle", type=float, default=2.0, help="seconds idle before reading memory")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    args = ap.parse_args()

    why_not = netns_ok()
    netns_s = statistics.median(netns_setup_s() for _ in range(3)) if why_not is None else None
    for system in [s.strip() for s in args.systems.split(",") if s.strip()]:
        if system not in SYSTEMS:
            out({"bench": "startup", "system": system, "error": "unknown anchor"})
            continue
        venv_name, script_name, dist = SYSTEMS[system]
        venv = ANCHOR_DIR / venv_name
        python = venv / "bin" / "python"
        if not python.exists():
            out({"bench": "startup", "system": system, "error": f"venv missing: {venv} (run setup.sh)"})
            continue
        if why_not is not None:
            out({"bench": "startup", "system": system, "error": f"no loopback-only netns: {why_not}"})
            continue
        results = []
        with tempfile.TemporaryDirectory(prefix=f"anchor-{system}-") as data_dir:
            try:
                # same data dir each run: a restart with an existing key, as bench/startup.py does for ours
                results = [one_run(python, HERE / script_name, data_dir, args.idle) for _ in range(args.runs)]
            except Exception as e:
                out({"bench": "startup", "system": system, "error": str(e)[-800:]})
                continue
        version = dist_version(venv, dist)
        out(
            median_line(
                system,
                "ready_s",
                [r["ready_s"] for r in results],
                version=version,
                netns_setup_s=round(netns_s, 4),
                ready_s_self_median=round(statistics.median(r["ready_s_self"] for r in results), 4),
            )
        )
        out(median_line(system, "ready_cpu_s", [r["ready_cpu_s"] for r in results], version=version))
        out(
            median_line(
                system,
                "idle_rss_mib",
                [r["rss_mib"] for r in results],
                version=version,
                pss_median=round(statistics.median(r["pss_mib"] for r in results), 2),
                procs=results[0]["procs"],
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
