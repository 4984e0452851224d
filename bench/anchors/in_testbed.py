"""bench/anchors/in_testbed: the anchors' own bench scripts, each process in a host of a WAN testbed.

bench/wan.py runs Lattica and hivemind beside Lattice under the same preset and in the same run with
this (``--anchors lattica,hivemind``). The scripts are those of the loopback benches (rpc_*.py,
dht_*.py), started with their own venvs (bench/anchors/setup.sh) and ``--host`` set to the host's
testbed address, so every byte between two processes crosses the emulated links.

- :func:`rpc`: server in one host, client in another; the client's JSON lines.
- :func:`dht`: one node per host (the first with no bootstrap, the others bootstrapping from it),
  then a writer in one more host (it stores and stays in the swarm) and a reader in another (it
  joins after the stores and gets); the per-operation samples.

Stdlib only, like the scripts; the testbed is any object with ``popen(host, argv, **kw)`` and
``ip(host)`` (lattice.testing.wan.WanTestbed).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # loaded by path (bench/wan.py, tests): its siblings are plain modules
from run_dht import ANCHOR_DIR, HIVEMIND_NODE_MIB, dist_version, mem_available_mib  # noqa: E402

SYSTEMS = {"lattica": ".venv-lattica", "hivemind": ".venv-hivemind"}  # name: venv dir (= distribution)
START_PARALLEL = 4  # node processes starting at once (hivemind imports torch: CPU-bound)
ENV = {"PYTHONUNBUFFERED": "1", "HIVEMIND_LOGLEVEL": "WARNING", "RUST_LOG": "error"}


class AnchorError(RuntimeError):
    """An anchor could not give a figure (the message says why, with the process's stderr tail)."""


def python_of(system: str) -> Path:
    return ANCHOR_DIR / SYSTEMS[system] / "bin" / "python"


def unavailable(system: str) -> str | None:
    """None if ``system``'s venv is there, else why not (one line)."""
    if system not in SYSTEMS:
        return f"unknown anchor {system!r} (known: {', '.join(SYSTEMS)})"
    if not python_of(system).exists():
        return f"venv missing: {python_of(system).parent.parent} (run bench/anchors/setup.sh)"
    return None


def version(system: str) -> str | None:
    """The installed version of the anchor's distribution (from its dist-info)."""
    return dist_version(ANCHOR_DIR / SYSTEMS[system], system)


class Script:
    """One anchor script in one testbed host: stdin a pipe (EOF tells it to stop), its JSON stdout
    lines into a shared queue as (tag, line) and (tag, None) at EOF (an RPC server's "ADDR x" line
    as {"addr": x}), stderr into a file."""

    def __init__(self, tb: Any, host: str, system: str, script: str, args: list[str], lines: queue.Queue,
                 work: Path, tag: str) -> None:  # fmt: skip
        self.tag, self.log = tag, work / f"{tag}.err"
        argv = [str(python_of(system)), str(HERE / script), "--host", tb.ip(host), *args]
        with open(self.log, "wb") as err:
            self.proc = tb.popen(host, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                 env={**os.environ, **ENV})  # fmt: skip
        threading.Thread(target=self._pump, args=(lines,), daemon=True).start()

    def _pump(self, lines: queue.Queue) -> None:
        for raw in self.proc.stdout:
            if raw.startswith(b"ADDR "):
                lines.put((self.tag, {"addr": raw.decode(errors="replace").split(None, 1)[1].strip()}))
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if isinstance(line, dict):
                    lines.put((self.tag, line))
        lines.put((self.tag, None))

    def close_stdin(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def err_tail(self, n: int = 500) -> str:
        try:
            return self.log.read_bytes()[-n:].decode(errors="replace").strip()
        except OSError:
            return ""


def _stop(scripts: list[Script], grace_s: float = 10.0) -> None:
    """EOF on every script's stdin (they shut down), then kill what is still running."""
    for s in scripts:
        s.close_stdin()
    end = time.monotonic() + grace_s
    for s in scripts:
        with contextlib.suppress(subprocess.TimeoutExpired):
            s.proc.wait(max(0.1, end - time.monotonic()))
    for s in scripts:
        s.kill()


def _next(lines: queue.Queue, deadline: float) -> tuple[str | None, dict | None]:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    try:
        return lines.get(timeout=left)
    except queue.Empty:
        return None, None


def rpc(tb: Any, system: str, src: str, dst: str, *, runs: int, metrics: list[str], rtt_calls: int,
        timeout: float = 600) -> list[dict]:  # fmt: skip
    """The anchor's RPC figures from a client in ``src`` to a server in ``dst``: its JSON lines
    (``metric``, ``runs``, ``median``; MiB/s and ms), or AnchorError."""
    script = f"rpc_{system}.py"
    lines: queue.Queue = queue.Queue()
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix=f"anchor-wan-rpc-{system}-") as tmp:
        work = Path(tmp)
        serve = ["--role", "server", "--max-seconds", str(int(timeout) + 60)]
        server = Script(tb, dst, system, script, serve, lines, work, "server")
        scripts, out = [server], []
        try:
            addr = _server_addr(lines, server, deadline)
            args = ["--role", "client", "--server", addr, "--runs", str(runs), "--rtt-calls", str(rtt_calls)]
            args += ["--metrics", ",".join(metrics), "--call-timeout", str(int(timeout))]
            client = Script(tb, src, system, script, args, lines, work, "client")
            scripts.append(client)
            while True:
                tag, line = _next(lines, deadline)
                if tag == "client" and line is None:
                    break
                if tag == "client" and line is not None and "metric" in line:
                    out.append(line)
            if client.proc.wait(30) != 0:
                raise AnchorError(f"client exit {client.proc.returncode}: {client.err_tail()}")
            return out
        except TimeoutError:
            tails = "; ".join(f"{s.tag}: {s.err_tail()}" for s in scripts)
            raise AnchorError(f"timeout ({timeout:.0f} s): {tails}") from None
        finally:
            _stop(scripts)


def _server_addr(lines: queue.Queue, server: Script, deadline: float) -> str:
    """The multiaddr the RPC server printed when it was ready."""
    while True:
        tag, line = _next(lines, deadline)
        if tag == server.tag and line is None:
            raise AnchorError(f"server exited: {server.err_tail()}")
        if tag == server.tag and "addr" in line:
            return line["addr"]


def dht(tb: Any, system: str, hosts: list[str], writer: str, reader: str, *, ops: int, tag: str,
        timeout: float = 900, cpu: Callable[[list[int]], float] | None = None) -> dict[str, Any]:  # fmt: skip
    """One node of ``system`` per host of ``hosts``; ``ops`` stores from ``writer``, then as many
    gets from ``reader`` (it joins after the stores). Returns {"store_ms": [...], "store_success",
    "get_ms": [...], "get_success", "swarm_up_s", "peers_seen"}, or AnchorError. ``cpu(pids)``:
    the CPU seconds of those processes and their children; then "store_cpu_s" and "get_cpu_s" are
    what the swarm, writer and reader spent from the driver's join to its last operation."""
    script = f"dht_{system}.py"
    if system == "hivemind" and mem_available_mib() < len(hosts) * HIVEMIND_NODE_MIB + 2048:
        raise AnchorError(
            f"not enough memory for {len(hosts)} hivemind processes ({mem_available_mib():.0f} MiB)"
        )
    lines: queue.Queue = queue.Queue()
    deadline = time.monotonic() + timeout
    scripts: dict[str, Script] = {}
    sockets: list[str] = []  # hivemind's p2pd control sockets in /tmp (a killed p2pd leaves its own)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix=f"anchor-wan-dht-{system}-") as tmp:
        work = Path(tmp)

        def start(i: int, host: str, boot: str, args: list[str]) -> None:
            extra = ["--data-dir", str(work / host)] if system == "lattica" else []
            scripts[host] = Script(
                tb, host, system, script, ["--bootstrap", boot, *args, *extra], lines, work, host
            )

        def wait(what: str) -> dict:
            while True:
                who, line = _next(lines, deadline)
                if who is not None and line is None and who in scripts:
                    raise AnchorError(f"{who} exited while waiting for {what}: {scripts[who].err_tail()}")
                if line is not None:
                    sockets.extend(line.get("sockets", []))
                    if what in line:
                        return line

        try:
            t0 = time.monotonic()
            start(0, hosts[0], "none", ["--role", "node"])
            boot = wait("maddr")["maddr"]
            wait("ready")
            started, ready = 1, 1
            while ready < len(hosts):
                while started < len(hosts) and started - ready < START_PARALLEL:
                    start(started, hosts[started], boot, ["--role", "node"])
                    started += 1
                wait("ready")
                ready += 1
            result["swarm_up_s"] = round(time.monotonic() - t0, 1)
            common = ["--role", "driver", "--ops", str(ops), "--nodes", str(len(hosts)), "--tag", tag]
            for part, host in (("store", writer), ("get", reader)):
                start(0, host, boot, [*common, "--part", part])
                result["peers_seen"] = wait("peers_seen")["peers_seen"]
                pids = [s.proc.pid for s in scripts.values()]
                before = cpu(pids) if cpu else 0.0
                line = wait("samples")
                if cpu:
                    result[f"{part}_cpu_s"] = round(cpu(pids) - before, 3)
                result[f"{part}_ms"], result[f"{part}_success"] = line["samples"], line["success"]
            return result
        except TimeoutError:
            raise AnchorError(f"timeout ({timeout:.0f} s); {len(scripts)} processes started") from None
        finally:
            _stop(list(scripts.values()))
            for path in sockets:
                Path(path).unlink(missing_ok=True)
