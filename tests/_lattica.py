"""Lattica nodes and lattice-node daemons side by side in a loopback-only network namespace.

Lattica 1.0.21 (rust-libp2p core, Python SDK) lives in a venv of its own: the one
bench/anchors/setup.sh builds ($LATTICE_ANCHOR_DIR/.venv-lattica), made here with pip if missing.
Lattica queries public STUN servers at every start, so everything runs in a network namespace that
holds only loopback: a holder process owns it (``unshare -n``), the others join it (``nsenter``).
Control sockets are files, so the test drives the daemons from the root namespace.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["LATTICA_VERSION", "LatticaPeer", "LoopbackNamespace", "lattica_python"]

LATTICA_VERSION = "1.0.21"
ANCHOR_DIR = Path(os.environ.get("LATTICE_ANCHOR_DIR", Path.home() / ".cache" / "lattice-anchors"))
PEER_SCRIPT = Path(__file__).with_name("_lattica_peer.py")


def _has_lattica(python: Path) -> bool:
    probe = "import importlib.metadata as m, lattica; print(m.version('lattica'))"
    try:
        r = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and r.stdout.strip() == LATTICA_VERSION


def lattica_python() -> tuple[Path | None, str]:
    """The Lattica venv's python (made with pip if missing), or None and why it cannot be had."""
    venv = ANCHOR_DIR / ".venv-lattica"
    python = venv / "bin" / "python"
    if python.exists() and _has_lattica(python):
        return python, ""
    ANCHOR_DIR.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            f"lattica=={LATTICA_VERSION}",
        ],
    ]
    for argv in steps:
        if argv[0] == str(python) and not python.exists():
            break
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"{' '.join(argv[:4])}: {exc}"
        if r.returncode != 0:
            return None, f"lattica=={LATTICA_VERSION} could not be installed: {r.stderr.strip()[-300:]}"
    return (python, "") if _has_lattica(python) else (None, f"lattica=={LATTICA_VERSION} does not import")


class LoopbackNamespace:
    """A network namespace holding only loopback (up), alive while its holder process runs."""

    def __init__(self) -> None:
        self.holder: subprocess.Popen | None = None

    @staticmethod
    def unavailable() -> str | None:
        """None if a namespace can be made here, else why not (root, unshare, nsenter, ip)."""
        for tool in ("unshare", "nsenter", "ip"):
            if shutil.which(tool) is None:
                return f"{tool} not found"
        if os.geteuid() != 0:
            return "a network namespace needs root"
        return None

    def __enter__(self) -> LoopbackNamespace:
        # the holder exits when we close its stdin (or die): the namespace goes with its last process
        script = "ip link set lo up && echo up && exec cat >/dev/null"
        self.holder = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        if self.holder.stdout.readline().strip() != "up":
            raise RuntimeError("could not bring loopback up in a new network namespace")
        return self

    @property
    def wrapper(self) -> list[str]:
        """The command prefix that runs a program inside the namespace."""
        assert self.holder is not None
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net"]

    def __exit__(self, *exc: object) -> None:
        if self.holder is not None:
            self.holder.stdin.close()
            try:
                self.holder.wait(5)
            except subprocess.TimeoutExpired:
                self.holder.kill()
                self.holder.wait(5)


class LatticaPeer:
    """One Lattica node in ``ns`` (tests/_lattica_peer.py), on 127.0.0.1:``port``."""

    def __init__(self, python: Path, ns: LoopbackNamespace, data_dir: Path, port: int,
                 bootstrap: list[str] | None = None) -> None:  # fmt: skip
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / "stderr.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [*ns.wrapper, str(python), str(PEER_SCRIPT), str(data_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )  # fmt: skip
        reply = self.call("build", timeout=30, port=port, bootstrap=bootstrap or [])
        self.addr: str = reply["addr"]
        self.peer_id: str = reply["peer_id"]

    def call(self, op: str, timeout: float = 20.0, **args: object) -> dict:
        """Send one command, return its reply; RuntimeError on an error reply, a timeout or exit."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"Lattica peer gave no answer to {op} ({self.proc.poll()}): {self.log()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"Lattica {op}: {reply['error']}")
        return reply

    def peers(self) -> list[str]:
        return self.call("peers")["peers"]

    def wait(self, check, timeout: float, what: str, interval: float = 0.1):
        """Poll ``check(self)`` until truthy; TimeoutError naming ``what``."""
        end = time.monotonic() + timeout
        while True:
            got = check(self)
            if got:
                return got
            if time.monotonic() > end:
                raise TimeoutError(f"Lattica {self.peer_id[-6:]}: {what} within {timeout} s")
            time.sleep(interval)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
