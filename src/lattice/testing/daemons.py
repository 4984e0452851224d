"""`lattice-node` daemons as real processes, optionally inside testbed namespaces (tests, benches).

Control sockets are files, so the driving process (in the root namespace) reaches every daemon
through ``lattice.Client`` whatever network namespace the daemon runs in.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lattice.control.client import Client
from lattice.testing.netns import Testbed

CLI = [sys.executable, "-m", "lattice.cli"]


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen
    info: dict  # the ready file: peer_id, addrs, control
    started_at: float  # time.monotonic() just before the process was started

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]

    def client(self) -> Client:
        return Client(self.info["control"])

    def call(self, op: str, **kw: Any) -> Any:
        with self.client() as client:
            return client.call(op, **kw)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def log(self) -> str:
        path = Path(self.info.get("log", ""))
        return path.read_text(errors="replace")[-4000:] if path.is_file() else ""


def start_daemon(
    workdir: Path,
    name: str,
    args: list[str],
    testbed: Testbed | None = None,
    host: str | None = None,
    timeout: float = 20.0,
    command: str = "run",
    wrapper: Sequence[str] = (),
) -> Daemon:
    """Start ``lattice-node run`` (in ``testbed`` namespace ``host`` if given) and wait until ready.

    Its data directory, control socket, ready file and log live under ``workdir/name``. ``wrapper``:
    a command the daemon runs under (e.g. one that joins a memory cgroup, then execs its arguments)."""
    home = workdir / name
    home.mkdir(parents=True, exist_ok=True, mode=0o700)  # the daemon refuses a data dir others can write
    ready = home / "ready.json"
    ready.unlink(missing_ok=True)
    log = home / "daemon.log"
    argv = [
        *wrapper, *CLI, command, "--data-dir", str(home), "--control", str(home / "c.sock"),
        "--ready-file", str(ready), *args,
    ]  # fmt: skip
    started = time.monotonic()
    with log.open("w") as out:
        if testbed is not None:
            proc = testbed.popen(host or name, argv, stdout=out, stderr=subprocess.STDOUT)
        else:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = started + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"daemon {name} exited ({proc.returncode}): {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"daemon {name} not ready in {timeout} s: {log.read_text()[-2000:]}")
        time.sleep(0.01)
    info = json.loads(ready.read_text())
    info["log"] = str(log)
    return Daemon(name, proc, info, started)


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``check`` until it returns something truthy; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # the daemon may be between states: keep polling
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(
        f"{what} not within {timeout} s" + (f" (last error: {last_error})" if last_error else "")
    )


TESTBED_PORT = 4001  # each testbed host has addresses of its own: one well-known port serves them all


def relay_args(*extra: str, port: int = TESTBED_PORT) -> list[str]:
    """`run` arguments of a public relay (and bootstrap) node listening on all its host's addresses."""
    return ["--listen", f"/ip4/0.0.0.0/tcp/{port}", "--relay", *extra]


def peer_args(*bootstraps: str, port: int = TESTBED_PORT) -> list[str]:
    """`run` arguments of a peer (bench ops enabled) that knows only ``bootstraps``."""
    args = ["--listen", f"/ip4/0.0.0.0/tcp/{port}", "--enable-bench"]
    for boot in bootstraps:
        args += ["--bootstrap", boot]
    return args


def host_addr(testbed: Testbed, daemon: Daemon, host: str, port: int = TESTBED_PORT) -> str:
    """The multiaddr (with /p2p) of ``daemon`` listening on ``port`` of testbed host ``host``."""
    return f"/ip4/{testbed.ip(host)}/tcp/{port}/p2p/{daemon.peer_id}"


def peer_path(daemon: Daemon, peer: str) -> str | None:
    """ "direct", "relayed" or None (not connected), as the daemon sees its connection to ``peer``."""
    for row in daemon.call("peers"):
        if row["peer_id"] == peer:
            return "relayed" if row["relayed"] else "direct"
    return None


__all__ = [
    "TESTBED_PORT",
    "Daemon",
    "host_addr",
    "peer_args",
    "peer_path",
    "relay_args",
    "start_daemon",
    "wait_for",
]  # fmt: skip
