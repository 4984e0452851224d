"""Shared fixtures: real hosts on loopback."""

from __future__ import annotations

import pytest

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


def full_addr(host):
    return host.listen_addrs[0].with_peer(host.peer_id)
