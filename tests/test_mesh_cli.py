"""`serve-model` and `generate` as processes: torch threads shared among the servers of a machine,
and one-line errors that name the real cause."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import trio

pytest.importorskip("torch")

from lattice import Node, NodeConfig
from lattice.apps.mesh_inference import machine
from lattice.testing.daemons import CLI, start_daemon

UNUSED = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWBd5JqL1FxjGC5TdLjYcer7iy7Zvc9Wpc5kjAPHEKu5CA"


@pytest.fixture
def isolated_machine(tmp_path, monkeypatch):
    """The servers of this test register in their own directory (other engineers run servers too)."""
    monkeypatch.setenv(machine.ENV_DIR, str(tmp_path / "mesh-servers"))
    return tmp_path


def _serve(tmp_path, name, boot=(), *extra):
    args = ["--model", "tiny-random:0", "--blocks", "0:6", "--listen", "/ip4/127.0.0.1/tcp/0",
            "--announce-interval", "2", *extra]  # fmt: skip
    for addr in boot:
        args += ["--bootstrap", addr]
    return start_daemon(tmp_path, name, args, command="serve-model", timeout=60)


def test_threads_are_the_cores_shared_among_the_servers():
    assert machine.threads_for(8, 1) == 8
    assert machine.threads_for(8, 3) == 2
    assert machine.threads_for(2, 5) == 1
    assert machine.threads_for(1, 0) == 1


async def _threads(addr: str, peer: str, tmp_path) -> int:
    cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / "probe", control=False)
    async with Node(cfg) as node:
        await node.connect(addr)
        return (await node.rpc.call(peer, "mesh.info", {}, timeout=10))["threads"]


def test_two_servers_on_a_machine_share_its_cores(isolated_machine):
    """torch's default (one thread per core in each server) oversubscribes the cores: each server
    takes its share, and the first one gives up threads when the second starts."""
    tmp_path = isolated_machine
    cores = machine.cores()
    first = _serve(tmp_path, "s0")
    second = None
    try:
        assert trio.run(_threads, first.info["addrs"][0], first.peer_id, tmp_path) == cores
        second = _serve(tmp_path, "s1", first.info["addrs"][:1])
        share = machine.threads_for(cores, 2)
        assert trio.run(_threads, second.info["addrs"][0], second.peer_id, tmp_path) == share
        deadline = time.monotonic() + 10  # the first re-counts every 2 s, applies at its next step
        while trio.run(_threads, first.info["addrs"][0], first.peer_id, tmp_path) != share:
            assert time.monotonic() < deadline, "the first server kept its threads"
            time.sleep(0.5)
    finally:
        for d in (first, second):
            if d is not None:
                d.stop()


def _generate(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    argv = [*CLI, "generate", "--model", "tiny-random:0", "--tokens", "1,2", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def test_an_unreachable_bootstrap_is_named_in_one_line():
    done = _generate("--bootstrap", UNUSED, "--timeout", "3")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("lattice-node: error: cannot reach the --bootstrap peer (cannot connect to ")
    assert "127.0.0.1:1" in lines[0] and "no stage server" not in lines[0]


@pytest.mark.slow  # the client looks for a replacement for recover_timeout (10 s): ~18 s in all
def test_a_server_that_dies_mid_generation_with_no_replacement_is_named_in_one_line(isolated_machine):
    tmp_path = isolated_machine
    server = _serve(tmp_path, "s0", (), "--max-context", "2048", "--threads", "1")
    try:
        argv = [*CLI, "generate", "--model", "tiny-random:0", "--tokens", "1,2", "--max-new-tokens", "1500",
                "--bootstrap", server.info["addrs"][0]]  # fmt: skip
        gen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert gen.stdout is not None
        gen.stdout.read(40)  # tokens are coming
        server.stop(signal.SIGKILL)
        _out, err = gen.communicate(timeout=90)
    finally:
        server.stop(signal.SIGKILL)
    assert gen.returncode == 2
    lines = [line for line in err.strip().splitlines() if not line.startswith("chain:")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lattice-node: error: stage server {server.peer_id} (blocks 0:6) failed (")
    assert "and no stage server announces tiny-random-0" in lines[0] or "nobody serves blocks 0:6" in lines[0]
