"""Attacks on the daemon's local files (issue 16, defect 15): files planted by another local user,
and a remote peer filling the tensor inbox (``lattice-node run --inbox``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

INBOX_METHOD = "lattice.inbox.put"


def plant_symlink(at: Path, target: Path) -> Path:
    """What another local user does in a directory it can write: a symlink where the daemon will
    create a file, so that a daemon that follows it writes ``target`` instead."""
    at.unlink(missing_ok=True)
    at.symlink_to(target)
    return at


async def fill_inbox(
    victim: str,
    workdir: Path,
    count: int,
    nbytes: int = 1024,
    prefix: str = "junk",
    keypair: Any = None,
    timeout: float = 30.0,
) -> dict:
    """Send up to ``count`` tensors of ``nbytes`` to the victim's inbox from one identity (``keypair``,
    default a fresh one), stopping at the first refusal; returns the replies and the refusal."""
    from lattice import Node, NodeConfig
    from lattice.errors import LatticeError

    config = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=workdir, control=False)
    replies: list[dict] = []
    error = None
    async with Node(config, keypair=keypair) as node:
        tensor = np.zeros(max(nbytes, 1), dtype=np.uint8)
        for i in range(count):
            payload = {"name": f"{prefix}{i}", "tensor": tensor}
            try:
                replies.append(await node.rpc.call(victim, INBOX_METHOD, payload, timeout=timeout))
            except LatticeError as exc:
                error = str(exc)
                break
        return {"peer_id": str(node.peer_id), "stored": len(replies), "replies": replies, "error": error}
