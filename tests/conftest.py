"""Shared fixtures: real hosts on loopback."""

from __future__ import annotations

import pytest
import trio

from lattice.identity import KeyPair
from lattice.transport import HostConfig, open_host


@pytest.fixture
def host_factory(nursery):
    """Start hosts listening on 127.0.0.1 that live as long as the test."""

    async def make(config: HostConfig | None = None):
        import trio

        ready = trio.Event()
        box = {}

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            async with open_host(KeyPair.generate(), config) as host:
                await host.listen("/ip4/127.0.0.1/tcp/0")
                box["host"] = host
                ready.set()
                await trio.sleep_forever()

        nursery.start_soon(run)
        await ready.wait()
        return box["host"]

    return make


@pytest.fixture
def one_torch_thread():
    """Tiny tensors (mesh tests): intra-op threads only add barrier waits, slow on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fashion_mnist():
    """The Fashion-MNIST directory: the installed package's, or fetched without root into ~/.cache
    (apt-get download + dpkg-deb -x); skips with the reason where neither works. Exported as
    $LATTICE_FMNIST_DIR so the processes a test starts find it too."""
    import os

    from lattice.apps.gossip_sgd import data

    found = os.environ.get("LATTICE_FMNIST_DIR") or data.find_fashion_mnist()
    if not found:
        try:
            found = data.fetch_fashion_mnist()
        except data.DatasetMissing as exc:
            pytest.skip(f"needs Fashion-MNIST: {exc}")
    os.environ["LATTICE_FMNIST_DIR"] = found
    return found


def full_addr(host):
    return host.listen_addrs[0].with_peer(host.peer_id)


async def dht_swarm(tmp_path, nursery, count: int = 6, k: int | None = None) -> list:
    """``count`` nodes (replication factor ``k`` if given) joined through the first, running in
    ``nursery`` until the test ends; returns once every routing table is filled."""
    from contextlib import AsyncExitStack

    from lattice import Node, NodeConfig

    nodes: list = []
    ready = trio.Event()
    full = min(count - 1, k) if k is not None else count - 1

    async def run() -> None:
        async with AsyncExitStack() as stack:
            for i in range(count):
                boot = [nodes[0].addrs[0]] if nodes else []
                cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / f"n{i}", control=False,
                                 bootstrap=boot)  # fmt: skip
                node = Node(cfg)
                if k is not None:
                    node.dht.config.k = k
                nodes.append(await stack.enter_async_context(node))
            with trio.fail_after(10):
                while any(len(n.dht.table) < full for n in nodes):
                    await trio.sleep(0.05)
            ready.set()
            await trio.sleep_forever()

    nursery.start_soon(run)
    await ready.wait()
    return nodes


async def rpc_pair(tmp_path, nursery, client_max_message: int | None = None) -> tuple:
    """Two running nodes, b connected to a; a serves 'echo' and accepts 64 MiB messages (b too if
    ``client_max_message`` says so). Returns (a, b, a's address as b dialled it)."""
    from lattice import Node, NodeConfig
    from lattice.rpc import RPCConfig
    from lattice.rpc.service import RPC

    def cfg(name):
        return NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / name, control=False)

    box = {}
    ready = trio.Event()

    async def run():
        client = {"services": [RPC(RPCConfig(max_message=client_max_message))]} if client_max_message else {}
        async with (
            Node(cfg("a"), services=[RPC(RPCConfig(max_message=64 << 20))]) as a,
            Node(cfg("b"), **client) as b,
        ):
            a.rpc.register("echo", lambda x: x, max_payload=64 << 20)
            box["peer"] = await b.connect(a.addrs[0])
            box["a"], box["b"] = a, b
            ready.set()
            await trio.sleep_forever()

    nursery.start_soon(run)
    await ready.wait()
    return box["a"], box["b"], box["peer"]
