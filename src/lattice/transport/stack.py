"""The host with its standard protocols (identify, ping): what nodes and tests open."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from lattice.identity import KeyPair
from lattice.transport import identify, ping
from lattice.transport.host import Host, HostConfig

__all__ = ["open_host"]


@asynccontextmanager
async def open_host(keypair: KeyPair, config: HostConfig | None = None) -> AsyncIterator[Host]:
    """Run a host for the duration of the block; on exit every connection is closed."""
    async with trio.open_nursery() as nursery:
        host = Host(keypair, config or HostConfig(), nursery)
        identify.install(host)
        ping.install(host)
        try:
            yield host
        finally:
            await host.aclose()
            nursery.cancel_scope.cancel()
