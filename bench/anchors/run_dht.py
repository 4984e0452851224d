"""bench/anchors/run_dht: DHT store/get latency and churn survival of Lattica and hivemind swarms.

    python bench/anchors/run_dht.py [--nodes 32] [--ops 300] [--runs 1] [--only lattica,hivemind]
                                    [--churn | --no-churn] [--timeout 600] [--hivemind-per-process auto]

Stdlib only; the anchors run with their own venvs (bench/anchors/setup.sh, under $LATTICE_ANCHOR_DIR,
default ~/.cache/lattice-anchors). Root needed: each swarm lives in its own named network namespace
(`ip netns add`) holding only loopback, and every process of it is started with `ip netns exec`.

One run of one anchor:
 1. node processes on 127.0.0.1 (dht_lattica.py / dht_hivemind.py --role node): the first one with no
    bootstrap, the others bootstrapping from the first node, at most --start-parallel of them starting
    at a time. Lattica: one node per process. hivemind: one asyncio DHTNode (+ its p2pd) per process,
    or K per process with --hivemind-per-process K (auto: 1 if memory allows, else 8).
 2. a driver process (--role driver) whose own client nodes join the swarm, wait until they see
    min(nodes, 20) peers (30 s at most), store --ops distinct keys (~100-byte values, 10 min expiry)
    one at a time from a writer node, then get each once from a reader node; each op is timed alone.
 3. with churn (the default): int(0.3 * nodes) nodes, chosen at random among all but the first, are
    SIGKILLed at once (a Lattica node process; a hivemind node's p2pd, and its process when it holds
    one node); then a fresh client node joins and retries every key for up to 30 s from the kill.
 4. all processes killed, namespace deleted.

Prints JSON lines (medians pooled over the ops of all runs; `runs` = the per-run medians):
    {"bench": "dht", "system", "metric": "store_ms" | "get_ms", "median", "p90", "success", "nodes", ...}
    {"bench": "dht", "system", "metric": "churn_retrievable", "median": fraction, "killed", "seconds", ...}
    {"bench": "dht", "system", "metric": "swarm_pss_mib", "median", "rss_mib", "procs", ...}
and {"bench": "dht", "system", "error"} for an anchor that is missing or failed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import queue
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ANCHOR_DIR = Path(os.environ.get("LATTICE_ANCHOR_DIR", Path.home() / ".cache" / "lattice-anchors"))
SYSTEMS = {
    # name: (venv dir, script, distribution whose version is reported)
    "lattica": (".venv-lattica", "dht_lattica.py", "lattica"),
    "hivemind": (".venv-hivemind", "dht_hivemind.py", "hivemind"),
}
TARGETS = {"store_ms": "<= 10", "get_ms": "<= 5", "churn_retrievable": ">= 0.99"}
HIVEMIND_NODE_MIB = 400  # per single-node hivemind process, with margin (measured PSS ~270 MiB)
PAGE = os.sysconf("SC_PAGE_SIZE")


def out(line: dict) -> None:
    print(json.dumps(line), flush=True)


def dist_version(venv: Path, dist: str) -> str | None:
    hits = glob.glob(str(venv / "lib" / "python*" / "site-packages" / f"{dist}-*.dist-info"))
    return Path(hits[0]).name[len(dist) + 1 : -len(".dist-info")] if hits else None


def mem_available_mib() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


class Netns:
    """A named network namespace with loopback up; deleted (after killing what is left in it) on close."""

    def __init__(self, name: str, create: bool = True):
        self.name = name
        if not create:  # an existing one, to be closed
            return
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
        try:
            self.run(["ip", "link", "set", "lo", "up"])
            links = self.run(["ip", "-o", "link"]).stdout.splitlines()
            if len(links) != 1 or ": lo:" not in links[0]:
                raise RuntimeError(f"namespace {name} holds more than loopback: {links}")
        except BaseException:
            self.close()
            raise

    def run(self, cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *cmd], check=True, capture_output=True, text=True, timeout=10
        )

    def pids(self) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True, timeout=10)
        return [int(p) for p in r.stdout.split()]

    def close(self) -> None:
        for _ in range(3):
            pids = self.pids()
            if not pids:
                break
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)


class Proc:
    """A process in the namespace: stdin a pipe, stdout JSON lines into a shared queue, stderr a file."""

    def __init__(self, tag: str, ns: Netns, cmd: list[str], lines: queue.Queue, log: Path, env: dict):
        self.tag, self.log = tag, log
        with open(log, "wb") as err:
            self.p = subprocess.Popen(
                ["ip", "netns", "exec", ns.name, *cmd],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        threading.Thread(target=self._pump, args=(lines,), daemon=True).start()

    def _pump(self, lines: queue.Queue) -> None:
        for raw in self.p.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict):
                lines.put((self.tag, line))
        lines.put((self.tag, None))  # EOF

    def tell(self, text: str) -> None:
        try:
            self.p.stdin.write(text.encode())
            self.p.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def close_stdin(self) -> None:
        try:
            self.p.stdin.close()
        except (BrokenPipeError, ValueError):
            pass

    def kill(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def err_tail(self, n: int = 400) -> str:
        try:
            return self.log.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""


def memory_of(pids: list[int]) -> tuple[float, float, int]:
    """(RSS, PSS, count) summed over pids, MiB."""
    rss_pages, pss_kib, count = 0, 0, 0
    for p in pids:
        try:
            with open(f"/proc/{p}/statm") as fh:
                rss_pages += int(fh.read().split()[1])
            with open(f"/proc/{p}/smaps_rollup") as fh:
                pss_kib += next(int(ln.split()[1]) for ln in fh if ln.startswith("Pss:"))
            count += 1
        except (OSError, StopIteration):
            continue
    return rss_pages * PAGE / 2**20, pss_kib / 1024, count


class Failed(RuntimeError):
    pass


def one_run(system: str, python: Path, script: Path, args, run: int, per_process: int) -> dict:
    """Build the swarm, drive it, churn it; return the run's samples and figures."""
    deadline = time.monotonic() + args.timeout
    lines: queue.Queue = queue.Queue()
    procs: dict[str, Proc] = {}
    env = dict(os.environ, PYTHONUNBUFFERED="1", HIVEMIND_LOGLEVEL="WARNING", RUST_LOG="error")
    ns = Netns(f"lattice-dht-{os.getpid()}-{system}-{run}")
    work = Path(tempfile.mkdtemp(prefix=f"anchor-dht-{system}-"))
    nodes: list[dict] = []  # one per swarm node, in start order: maddr, pid, p2pd_pid, sockets
    sockets: list[str] = []  # hivemind's p2pd control sockets in /tmp (a SIGKILLed p2pd leaves its own)
    result: dict = {"samples": {}}

    def next_line():
        left = deadline - time.monotonic()
        if left <= 0:
            raise Failed(f"timeout ({args.timeout:.0f} s per run)")
        try:
            return lines.get(timeout=left)
        except queue.Empty:
            return None, None

    def fail(why: str, tag: str) -> Failed:
        p = procs.get(tag)
        return Failed(f"{why}; {tag} stderr: {p.err_tail() if p else ''}")

    def start_node_proc(i: int, bootstrap: str, count: int) -> None:
        tag = f"n{i}"
        cmd = [str(python), str(script), "--role", "node", "--bootstrap", bootstrap, "--count", str(count)]
        if system == "lattica":
            cmd += ["--data-dir", str(work / tag)]
        procs[tag] = Proc(tag, ns, cmd, lines, work / f"{tag}.err", env)

    try:
        t_swarm = time.monotonic()
        n_procs = -(-args.nodes // per_process)
        counts = [min(per_process, args.nodes - i * per_process) for i in range(n_procs)]  # last may be short
        start_node_proc(0, "none", counts[0])
        boot, started, ready = None, 1, 0
        while ready < n_procs:
            tag, line = next_line()
            if tag is None:
                continue
            if line is None:
                if tag.startswith("n"):
                    raise fail("node process exited before it was ready", tag)
                continue
            if "maddr" in line:
                nodes.append(line)
                sockets.extend(line.get("sockets", []))
                if boot is None:
                    boot = line["maddr"]
            elif "ready" in line:
                ready += 1
            if boot is not None:  # keep at most --start-parallel processes starting at a time
                while started < n_procs and started - ready < args.start_parallel:
                    start_node_proc(started, boot, counts[started])
                    started += 1
        result["swarm_up_s"] = time.monotonic() - t_swarm
        if len(nodes) != args.nodes:
            raise Failed(f"{len(nodes)} nodes came up, {args.nodes} wanted")

        cmd = [str(python), str(script), "--role", "driver", "--bootstrap", boot, "--ops", str(args.ops)]
        cmd += ["--nodes", str(args.nodes), "--tag", f"{args.seed}-{run}"]
        if system == "lattica":
            cmd += ["--data-dir", str(work / "driver")]
        if args.churn:
            cmd.append("--churn")
        driver = procs["driver"] = Proc("driver", ns, cmd, lines, work / "driver.err", env)
        while True:
            tag, line = next_line()
            if tag != "driver":
                if line is None and tag is not None and not args.churn:
                    raise fail("a node process exited during the run", tag)
                continue
            if line is None:
                break
            if "samples" in line:
                result["samples"][line["metric"]] = (line["samples"], line["success"])
                if line["metric"] == "get_ms":  # the swarm's memory: all in the namespace but the driver
                    drv = {driver.p.pid, *_descendants(driver.p.pid)}
                    result["memory"] = memory_of([p for p in ns.pids() if p not in drv])
            elif line.get("event") == "node":
                sockets.extend(line.get("sockets", []))
            elif line.get("event") == "joined":
                result["peers_seen"] = line["peers_seen"]
            elif line.get("event") == "churn_ready":
                rng = random.Random(args.seed * 1000 + run)
                victims = rng.sample(range(1, args.nodes), int(args.nodes * 0.3))
                for v in victims:
                    node = nodes[v]
                    target = node.get("p2pd_pid") or node["pid"]
                    _kill(target)
                    if node.get("p2pd_pid") and per_process == 1:
                        _kill(node["pid"])
                result["killed"] = len(victims)
                driver.tell("go\n")
            elif line.get("metric") == "churn_retrievable":
                result["churn"] = line
        driver.p.wait(max(1.0, deadline - time.monotonic()))
        if driver.p.returncode != 0 or "get_ms" not in result["samples"]:
            raise fail(f"driver exit {driver.p.returncode}", "driver")
        if args.churn and "churn" not in result:
            raise fail("driver gave no churn figure", "driver")
        return result
    finally:
        for p in procs.values():
            p.close_stdin()  # nodes shut down on EOF
        end = time.monotonic() + 5
        for p in procs.values():
            try:
                p.p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs.values():
            p.kill()
        ns.close()
        for path in sockets:
            Path(path).unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = [], list(children.get(pid, []))
    while stack:
        p = stack.pop()
        found.append(p)
        stack.extend(children.get(p, []))
    return found


def report(system: str, version: str | None, args, results: list[dict], per_process: int) -> None:
    base = {"bench": "dht", "system": system, "version": version, "nodes": args.nodes}
    base["node_processes"] = -(-args.nodes // per_process)
    for metric in ("store_ms", "get_ms"):
        pooled = [x for r in results for x in r["samples"][metric][0]]
        success = statistics.mean(r["samples"][metric][1] for r in results)
        out(
            {
                **base,
                "metric": metric,
                "median": round(statistics.median(pooled), 3),
                "p10": round(pct(pooled, 0.10), 3),
                "p90": round(pct(pooled, 0.90), 3),
                "max": round(max(pooled), 3),
                "success": round(success, 4),
                "ops": len(pooled),
                "runs": [round(statistics.median(r["samples"][metric][0]), 3) for r in results],
                "target": TARGETS[metric],
            }
        )
    if all("churn" in r for r in results):
        fr = [r["churn"]["value"] for r in results]
        out(
            {
                **base,
                "metric": "churn_retrievable",
                "median": round(statistics.median(fr), 4),
                "runs": [round(x, 4) for x in fr],
                "killed": results[0]["killed"],
                "seconds": [r["churn"]["seconds"] for r in results],
                "join_s": [r["churn"]["join_s"] for r in results],
                "target": TARGETS["churn_retrievable"],
            }
        )
    mems = [r["memory"] for r in results if "memory" in r]
    if mems:
        out(
            {
                **base,
                "metric": "swarm_pss_mib",
                "median": round(statistics.median(m[1] for m in mems), 1),
                "rss_mib": round(statistics.median(m[0] for m in mems), 1),
                "procs": mems[0][2],
                "pss_per_node_mib": round(statistics.median(m[1] for m in mems) / args.nodes, 1),
            }
        )
    out(
        {
            **base,
            "metric": "swarm_up_s",
            "median": round(statistics.median(r["swarm_up_s"] for r in results), 3),
            "driver_peers_seen": results[0].get("peers_seen"),
        }
    )


def remove_stale_namespaces() -> None:
    """Delete lattice-dht-PID-* namespaces whose runner PID is gone (a runner killed by SIGKILL)."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    for entry in r.stdout.split("\n"):
        name = entry.split(" ")[0]
        parts = name.split("-")
        stale = len(parts) > 2 and parts[2].isdigit() and not os.path.exists(f"/proc/{parts[2]}")
        if name.startswith("lattice-dht-") and stale:
            Netns(name, create=False).close()


def netns_ok() -> str | None:
    if not shutil.which("ip"):
        return "ip (iproute2) not found"
    if os.geteuid() != 0:
        return "root needed for ip netns"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--ops", type=int, default=300)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--only", default=",".join(SYSTEMS), help="comma-separated subset of lattica,hivemind")
    ap.add_argument("--churn", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per anchor and run")
    ap.add_argument("--start-parallel", type=int, default=4, help="node processes starting at once")
    ap.add_argument("--hivemind-per-process", default="auto", help="DHTNodes per hivemind process, or auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.nodes < 4 or args.ops < 1:
        ap.error("need --nodes >= 4 and --ops >= 1")

    why_not = netns_ok()
    if why_not is None:
        remove_stale_namespaces()
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))  # clean up on SIGTERM too
    for system in [s.strip() for s in args.only.split(",") if s.strip()]:
        if system not in SYSTEMS:
            out({"bench": "dht", "system": system, "error": "unknown anchor"})
            continue
        venv_name, script_name, dist = SYSTEMS[system]
        venv = ANCHOR_DIR / venv_name
        python = venv / "bin" / "python"
        if not python.exists():
            out({"bench": "dht", "system": system, "error": f"venv missing: {venv} (run setup.sh)"})
            continue
        if why_not is not None:
            out({"bench": "dht", "system": system, "error": f"no loopback-only netns: {why_not}"})
            continue
        per_process = 1
        if system == "hivemind":
            if args.hivemind_per_process == "auto":
                need = args.nodes * HIVEMIND_NODE_MIB + 2048
                per_process = 1 if mem_available_mib() >= need else 8
            else:
                per_process = max(1, int(args.hivemind_per_process))
        results = []
        try:
            for run in range(args.runs):
                results.append(one_run(system, python, HERE / script_name, args, run, per_process))
        except Exception as e:
            out({"bench": "dht", "system": system, "error": f"{type(e).__name__}: {e}"[-1000:]})
            continue
        report(system, dist_version(venv, dist), args, results, per_process)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
