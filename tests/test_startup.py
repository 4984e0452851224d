"""Start-up cost (issue 19): a node becomes ready without loading what only some requests need
(numpy, pycrdt, the entry-point scan), and loads each of them when such a request comes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from lattice.testing.daemons import start_daemon

# what a node needs only for tensors / content chunks (numpy) and CRDT documents (pycrdt)
LAZY_LIBRARIES = ("numpy/_core/_multiarray_umath", "pycrdt/_pycrdt")


def _mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_a_ready_daemon_has_not_loaded_numpy_or_pycrdt(tmp_path):
    """`lattice-node run` with its default services, read from outside through /proc: the extension
    modules of numpy and pycrdt are not mapped once it is ready and a peer was served."""
    a = start_daemon(tmp_path, "a", ["--listen", "/ip4/127.0.0.1/tcp/0", "--log-level", "warning"])
    b = start_daemon(tmp_path, "b", ["--listen", "/ip4/127.0.0.1/tcp/0", "--log-level", "warning"])
    try:
        with b.client() as client:
            client.connect(a.info["addrs"][0])
            assert len(client.ping(a.peer_id)) == 1  # a serves a peer (identify, ping) ...
        maps = _mapped(a.proc.pid)
        assert [lib for lib in LAZY_LIBRARIES if lib in maps] == []  # ... without either library
    finally:
        a.stop()
        b.stop()


SCRIPT = textwrap.dedent(
    """
    import sys
    import trio
    from lattice import NodeConfig
    from lattice.plugins import build_node

    HEAVY = ("numpy", "pycrdt", "importlib.metadata")

    def loaded():
        return sorted(m for m in HEAVY if m in sys.modules)

    def cfg(tmp, name):
        return NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=f"{tmp}/{name}", control=False)

    async def main(tmp):
        async with build_node(cfg(tmp, "a")) as a, build_node(cfg(tmp, "b")) as b:
            print("ready", loaded())
            a.rpc.register("echo", lambda x: x)
            peer = await b.connect(a.addrs[0])
            reply = await b.rpc.call(peer, "echo", {"plain": [1, "two", b"3"]})
            print("plain call", reply == {"plain": [1, "two", b"3"]}, loaded())
            import numpy as np
            x = np.arange(12, dtype=np.float32).reshape(3, 4)
            y = await b.rpc.call(peer, "echo", {"t": x})
            print("tensor call", bool((y["t"] == x).all()) and y["t"].dtype == x.dtype)
            doc = a.crdt.open("d")
            doc.get_map("m")["k"] = 1
            print("document", dict(doc.get_map("m")) == {"k": 1.0}, "pycrdt" in sys.modules)

    trio.run(main, sys.argv[1])
    """
)


def test_numpy_and_pycrdt_load_with_the_first_request_that_needs_them(tmp_path):
    """Two nodes built as the daemon builds them, in a fresh interpreter: ready and a plain call
    with neither library (nor the entry-point scan) loaded; a tensor call and a document work."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == [
        "ready []",
        "plain call True []",
        "tensor call True",
        "document True True",
    ]
