"""bench/anchors/run_rpc: RPC round trip and tensor/bytes throughput of the anchors (Lattica, hivemind).

    python bench/anchors/run_rpc.py [--runs 5] [--only lattica|hivemind] [--timeout 300]

Stdlib only (our python 3.11). The venvs come from bench/anchors/setup.sh, under $LATTICE_ANCHOR_DIR
(default ~/.cache/lattice-anchors). For each anchor, one fresh network namespace holding only
loopback (`unshare -n` + `ip link set lo up`, needs root) holds two processes, each run with the
anchor's own venv python: `rpc_<system>.py --role server` (prints "ADDR <multiaddr>") and then
`rpc_<system>.py --role client --server <multiaddr>`, which measures and prints JSON lines; they are
relayed here with the anchor's version added. The namespace is made by re-running this script
inside it (`--inner SYSTEM`); it dies with its last process, nothing named is left to clean up.
Each anchor gets --timeout seconds; afterwards (or on timeout) every process still in its namespace
is killed.

Lines (medians of --runs runs; the 1 MiB figures use max(runs, 20) calls, as bench/rpc.py does):
    {"bench": "rpc", "system": ..., "metric": "rtt_ms" | "up_64mib_mibs" | "down_64mib_mibs" |
     "up_1mib_mibs" | "down_1mib_mibs" | <extra paths>, "median": ..., "runs": [...], "path": ...}
    {"bench": "rpc", "system": ..., "metric": ..., "error": ...}      a figure failed
    {"bench": "rpc", "system": ..., "error": ...}                     the anchor could not run
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ANCHOR_DIR = Path(os.environ.get("LATTICE_ANCHOR_DIR", Path.home() / ".cache" / "lattice-anchors"))
SYSTEMS = {
    # name: (venv dir, script, distribution whose version is reported)
    "lattica": (".venv-lattica", "rpc_lattica.py", "lattica"),
    "hivemind": (".venv-hivemind", "rpc_hivemind.py", "hivemind"),
}
NETNS = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']
SERVER_READY_S = 90.0  # hivemind imports torch and starts p2pd: ~2-3 s
SERVER_EXIT_S = 30.0


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


def netns_of(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def kill_netns(ns: str, grace_s: float = 5.0) -> list[int]:
    """SIGKILL every process whose network namespace is ns (ours only: the namespace is private to
    this run); wait until they are gone. Returns the pids that were still there."""
    if not ns or ns == netns_of("self"):
        return []  # never sweep our own (the host's) namespace
    victims = [int(p) for p in os.listdir("/proc") if p.isdigit() and netns_of(p) == ns]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.monotonic() + grace_s
    while time.monotonic() < end and any(netns_of(p) == ns for p in victims):
        time.sleep(0.05)
    return victims


def read_lines(proc: subprocess.Popen, deadline: float):
    """Yield stdout lines of proc until EOF; raise TimeoutError at the monotonic deadline."""
    buf = b""
    fd = proc.stdout.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            if buf:
                yield buf.decode(errors="replace")
            return
        buf += chunk
        while b"\n" in buf:
            ln, buf = buf.split(b"\n", 1)
            yield ln.decode(errors="replace")


def tail(path: str, n: int = 600) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - n))
            return fh.read().decode(errors="replace").strip()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# inner: runs inside the namespace; server and client are its children


def inner(system: str, runs: int, timeout: float) -> int:
    venv_name, script_name, _ = SYSTEMS[system]
    python = str(ANCHOR_DIR / venv_name / "bin" / "python")
    script = str(HERE / script_name)
    deadline = time.monotonic() + timeout
    out({"_netns": netns_of("self")})
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory(prefix=f"anchor-rpc-{system}-") as tmp:
        srv_err, cli_err = os.path.join(tmp, "server.err"), os.path.join(tmp, "client.err")
        with open(srv_err, "wb") as se:
            server = subprocess.Popen(
                [python, script, "--role", "server", "--max-seconds", str(int(timeout) + 60)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=se,
                env=env,
            )
        client = None
        try:
            addr = None
            for ln in read_lines(server, min(deadline, time.monotonic() + SERVER_READY_S)):
                if ln.startswith("ADDR "):
                    addr = ln.split(None, 1)[1].strip()
                    break
            if addr is None:
                out({"bench": "rpc", "system": system, "error": f"server exited: {tail(srv_err)}"})
                return 0
            with open(cli_err, "wb") as ce:
                client = subprocess.Popen(
                    [python, script, "--role", "client", "--server", addr, "--runs", str(runs)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=ce,
                    env=env,
                )
            for ln in read_lines(client, deadline):
                if ln.startswith("{"):
                    print(ln, flush=True)
            rc = client.wait(max(1.0, deadline - time.monotonic()))
            if rc != 0:
                out({"bench": "rpc", "system": system, "error": f"client exit {rc}: {tail(cli_err)}"})
            server.stdin.close()  # the server's signal to close its node and exit
            try:
                server.wait(SERVER_EXIT_S)
            except subprocess.TimeoutExpired:
                out({"bench": "rpc", "system": system, "note": "server did not exit on stdin EOF; killed"})
            return 0
        except (TimeoutError, subprocess.TimeoutExpired):
            which = "client" if client is not None else "server start"
            err = tail(cli_err if client is not None else srv_err)
            out({"bench": "rpc", "system": system, "error": f"timeout ({timeout:.0f} s) in {which}: {err}"})
            return 0
        finally:
            for p in (client, server):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait(10)


# ---------------------------------------------------------------------------------------------
# outer


def run_anchor(system: str, runs: int, timeout: float) -> None:
    venv_name, _, dist = SYSTEMS[system]
    venv = ANCHOR_DIR / venv_name
    if not (venv / "bin" / "python").exists():
        out({"bench": "rpc", "system": system, "error": f"venv missing: {venv} (run setup.sh)"})
        return
    version = dist_version(venv, dist)
    cmd = [*NETNS, sys.executable, str(Path(__file__).resolve()), "--inner", system]
    cmd += ["--runs", str(runs), "--timeout", str(timeout)]
    ns = None
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        try:
            # the inner enforces the timeout itself; this is the backstop
            for ln in read_lines(proc, time.monotonic() + timeout + SERVER_EXIT_S + 30):
                try:
                    line = json.loads(ln)
                except json.JSONDecodeError:
                    continue
                if "_netns" in line:
                    ns = line["_netns"]
                    continue
                if line.get("bench") == "rpc" and version:
                    line.setdefault("version", version)
                out(line)
            proc.wait(30)
        except (TimeoutError, subprocess.TimeoutExpired):
            out({"bench": "rpc", "system": system, "error": f"driver timeout ({timeout:.0f} s + grace)"})
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(10)
            left = kill_netns(ns) if ns else []
            if left:
                out({"bench": "rpc", "system": system, "note": f"killed {len(left)} leftover processes"})
            if proc.returncode not in (0, -signal.SIGKILL):
                err.seek(0)
                tail_txt = err.read().decode(errors="replace")[-600:]
                out({"bench": "rpc", "system": system, "error": f"inner exit {proc.returncode}: {tail_txt}"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", choices=sorted(SYSTEMS), help="one anchor (default: all)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per anchor")
    ap.add_argument("--inner", choices=sorted(SYSTEMS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    runs = max(1, args.runs)
    if args.inner:
        return inner(args.inner, runs, args.timeout)
    systems = [args.only] if args.only else list(SYSTEMS)
    why_not = netns_ok()
    for system in systems:
        if why_not is not None:
            out({"bench": "rpc", "system": system, "error": f"no loopback-only netns: {why_not}"})
            continue
        run_anchor(system, runs, args.timeout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
