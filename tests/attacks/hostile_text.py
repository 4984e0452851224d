"""Text built to take over the operator's terminal (issue 16, defect 16): ANSI/OSC escape sequences,
C1 controls, bidi overrides and rich markup in a peer's identify agent string and in DHT values.

Each attack connects to the victim as an ordinary peer, runs ``during`` (e.g. the operator's
``lattice-node peers``) while still connected, and returns a dict of what happened.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

# ESC (CSI red, OSC 8 hyperlink, clear screen), C1 CSI, bidi override, and rich markup/link/emoji.
HOSTILE_TEXT = (
    "\x1b[31mred\x1b[0m \x1b]8;;https://evil.example\x1b\\osc-link\x1b]8;;\x1b\\ \x1b[2J"
    "\x9b31m c1 \u202eflipped\u202c [red]x[/] [link=https://evil.example]click[/link] :skull:"
)

During = Callable[[], Awaitable[Any]] | None


async def connect_with_agent(victim: str, agent: str = HOSTILE_TEXT, during: During = None) -> dict:
    """Connect to ``victim`` (a full multiaddr) with ``agent`` as the identify agent string."""
    from lattice.identity import KeyPair
    from lattice.transport import HostConfig, open_host

    async with open_host(KeyPair.generate(), HostConfig(agent_version=agent)) as host:
        conn = await host.connect(victim)
        result = await during() if during is not None else None
        return {"peer_id": str(host.peer_id), "victim": str(conn.remote_peer), "during": result}


async def store_dht_value(
    victim: str, key: str, value: bytes, workdir: Path, during: During = None, timeout: float = 10.0
) -> dict:
    """Join the victim's DHT as a fresh node and store ``value`` under ``key`` (on the victim too)."""
    from lattice import Node, NodeConfig

    config = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=workdir, control=False)
    async with Node(config) as node:
        await node.connect(victim)
        with trio.fail_after(timeout):
            while not len(node.dht.table):
                await trio.sleep(0.05)
            stored = await node.dht.put(key, value)
        result = await during() if during is not None else None
        return {"peer_id": str(node.peer_id), "stored_on": stored, "during": result}


async def serve_hostile_error(
    workdir: Path, during: Callable[[str], Awaitable[Any]], method: str = "evil", text: str = HOSTILE_TEXT
) -> dict:
    """Serve an RPC ``method`` whose error reply is ``text`` plus a forged second line; ``during``
    gets this node's address (to make the victim call it) and runs while it serves."""
    from lattice import Node, NodeConfig
    from lattice.errors import PayloadError

    node = Node(NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=workdir, control=False))

    async def evil(payload: Any) -> None:
        raise PayloadError(text + "\nlattice-node: all good")

    node.rpc.register(method, evil)
    async with node:
        result = await during(node.addrs[0])
        return {"peer_id": str(node.peer_id), "during": result}
