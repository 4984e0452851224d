"""A local testnet: N ``lattice-node`` daemons on 127.0.0.1 around one bootstrap node.

The bootstrap node starts first (the others need its address); the rest start in parallel.
Each daemon is a real process with its own data dir, control socket and ready file under the
testnet directory; ``testnet.json`` there lists them all, so scripts and tests can find them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lattice.errors import LatticeError

__all__ = ["Testnet", "TestnetNode"]

CLI = [sys.executable, "-m", "lattice.cli"]
MAX_NODES = 128  # ~62 MiB a daemon: 8 GiB, and ~60 s to converge on 2 cores
DHT_K = 20  # DHTConfig.k: the table a node needs (min(k, N-1), see Testnet.dht_target)


class TestnetError(LatticeError):
    """A testnet node failed to start."""


@dataclass
class TestnetNode:
    __test__ = False  # not a pytest class

    name: str
    proc: subprocess.Popen
    home: Path
    info: dict = field(default_factory=dict)  # the ready file: peer_id, addrs, control, http

    @property
    def ready_file(self) -> Path:
        return self.home / "ready.json"

    @property
    def log_file(self) -> Path:
        return self.home / "daemon.log"

    def row(self) -> dict:
        return {"name": self.name, "pid": self.proc.pid, **self.info}


class Testnet:
    """Start with :meth:`start`, stop with :meth:`stop` (or use as a context manager)."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        workdir: Path,
        nodes: int,
        extra_args: list[str] | None = None,
        bootstrap_args: list[str] | None = None,
        metrics: bool = True,
    ) -> None:
        if not 1 <= nodes <= MAX_NODES:
            raise TestnetError(f"--nodes must be between 1 and {MAX_NODES}")
        self.workdir = Path(workdir)
        self.count = nodes
        self.extra_args = list(extra_args or [])
        self.bootstrap_args = list(bootstrap_args or [])
        self.metrics = metrics
        self.nodes: list[TestnetNode] = []

    def _spawn(self, name: str, args: list[str]) -> TestnetNode:
        home = self.workdir / name
        home.mkdir(parents=True, exist_ok=True, mode=0o700)  # the daemon refuses a data dir others can write
        node = TestnetNode(name, None, home)  # type: ignore[arg-type]
        node.ready_file.unlink(missing_ok=True)
        argv = [
            *CLI, "run", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir", str(home),
            "--control", str(home / "c.sock"), "--ready-file", str(node.ready_file),
            "--reachability", "public", "--log-level", "warning", *args, *self.extra_args,
        ]  # fmt: skip
        if self.metrics:
            argv += ["--metrics-listen", "127.0.0.1:0"]
        with node.log_file.open("w") as out:  # own session: a terminal's Ctrl-C reaches only us
            node.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(node)
        return node

    def _wait_ready(self, nodes: list[TestnetNode], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        waiting = list(nodes)
        while waiting:
            for node in list(waiting):
                if node.ready_file.exists():
                    node.info = json.loads(node.ready_file.read_text())
                    waiting.remove(node)
                elif node.proc.poll() is not None:
                    tail = node.log_file.read_text(errors="replace")[-1500:].strip()
                    raise TestnetError(f"{node.name} exited with code {node.proc.returncode}: {tail}")
            if waiting and time.monotonic() > deadline:
                raise TestnetError(f"{', '.join(n.name for n in waiting)} not ready within {timeout:.0f} s")
            time.sleep(0.01)

    def start(self, timeout: float | None = None) -> Testnet:
        """Start every node and return once each has written its ready file (``timeout``: default
        30 s plus 0.5 s a node: N interpreters start at once on the machine's cores)."""
        timeout = timeout if timeout is not None else 30.0 + 0.5 * self.count
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            boot = self._spawn("node0", ["--bootstrap-node", *self.bootstrap_args])
            self._wait_ready([boot], timeout)
            addr = boot.info["addrs"][0]
            rest = [self._spawn(f"node{i}", ["--bootstrap", addr]) for i in range(1, self.count)]
            self._wait_ready(rest, timeout)
        except BaseException:
            self.stop()
            raise
        (self.workdir / "testnet.json").write_text(json.dumps([n.row() for n in self.nodes], indent=2))
        return self

    @property
    def bootstrap_addr(self) -> str:
        return self.nodes[0].info["addrs"][0]

    def routing_sizes(self) -> list[int]:
        """Each node's DHT routing-table size (through its control socket)."""
        from lattice.control.client import Client

        sizes = []
        for node in self.nodes:
            with Client(node.info["control"], timeout=5) as client:
                sizes.append(client.dht.status()["routing_table"])
        return sizes

    @property
    def dht_target(self) -> int:
        """The routing-table size every node needs: min(k, N-1). With k contacts a node's lookups
        reach every other node (Kademlia); a table of N-1 is neither needed nor reached above ~20
        nodes (bench/dht.py: a minimum table of 20 at 32 nodes)."""
        return min(DHT_K, self.count - 1)

    def wait_dht(self, timeout: float | None = None) -> float:
        """Wait until every node's DHT routing table holds ``dht_target`` contacts; seconds waited."""
        start = time.monotonic()
        timeout = timeout if timeout is not None else 30.0 + 0.25 * self.count
        sizes: list[int] = []
        while True:
            try:
                sizes = self.routing_sizes()
                if all(s >= self.dht_target for s in sizes):
                    return time.monotonic() - start
            except (LatticeError, OSError):
                pass  # a node between states: ask again
            if time.monotonic() - start > timeout:
                short = sorted(s for s in sizes if s < self.dht_target)[:10]
                raise TestnetError(
                    f"DHT did not converge within {timeout:.0f} s: {len(short)} node(s) below "
                    f"{self.dht_target} contacts (smallest tables: {short})"
                )
            time.sleep(0.2)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every node, then SIGKILL whatever is still running after ``timeout``."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(5)

    def __enter__(self) -> Testnet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_foreground(workdir: Path, nodes: int, extra: list[str], wait_dht: bool, as_json: bool) -> int:
    """``lattice-node testnet``: start, print how to reach the nodes, stop all on Ctrl-C/SIGTERM."""
    t0 = time.monotonic()
    net = Testnet(workdir, nodes, extra)
    stop_requested = []

    def on_signal(signum: int, _frame: object) -> None:
        stop_requested.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        net.start()
        ready_s = time.monotonic() - t0
        dht_s = net.wait_dht() + ready_s if wait_dht else None
        summary = {
            "nodes": [n.row() for n in net.nodes],
            "ready_s": round(ready_s, 3),
            "dht_converged_s": round(dht_s, 3) if dht_s is not None else None,
            "dir": str(workdir),
        }
        if as_json:
            print(json.dumps(summary), flush=True)
        else:
            _print_summary(net, ready_s, dht_s)
        while not stop_requested:
            for node in net.nodes:
                if node.proc.poll() is not None:
                    print(f"testnet: {node.name} exited ({node.proc.returncode}); stopping all", flush=True)
                    return 1
            time.sleep(0.2)
        return 0
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        net.stop()
        print(f"testnet: stopped {len(net.nodes)} node(s)", file=sys.stderr, flush=True)


def _print_summary(net: Testnet, ready_s: float, dht_s: float | None) -> None:
    print(f"testnet: {net.count} node(s) ready in {ready_s:.2f} s", flush=True)
    if dht_s is not None:
        want = net.dht_target
        print(f"testnet: every node has {want} DHT contacts (min(k, N-1)) after {dht_s:.2f} s", flush=True)
    print(f"bootstrap: {net.bootstrap_addr}")
    for node in net.nodes:
        info = node.info
        web = f"  web: {info['http']}" if info.get("http") else ""
        print(f"{node.name:>7}  {info['peer_id']}  {info['addrs'][0].split('/p2p/')[0]}{web}")
        print(f"         control: {info['control']}")
    first = net.nodes[-1].info["control"]
    print("\ntry:")
    print(f"  lattice-node status --control {first}")
    print(f"  lattice-node dht put hello world --control {first}")
    print(f"  lattice-node top --control {net.nodes[0].info['control']}")
    print(f"  lattice-node run --bootstrap {net.bootstrap_addr} --listen /ip4/127.0.0.1/tcp/0")
    print(f"data: {net.workdir}   (Ctrl-C stops all nodes)", flush=True)
