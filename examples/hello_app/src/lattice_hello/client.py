"""The `lattice-node hello` command's side: a short-lived node that calls ``hello.greet``."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lattice.cli import node_config
from lattice.observe.inert import inert
from lattice.plugins import build_node


async def greet(args: argparse.Namespace) -> str:
    """Call hello.greet on ``args.peer`` (a multiaddr) from a node of our own; the greeting, shown
    inert (it is what a remote peer chose to send)."""
    with tempfile.TemporaryDirectory(prefix="lattice-hello-") as tmp:  # a throwaway identity
        config = node_config(args, listen=["/ip4/127.0.0.1/tcp/0"], data_dir=Path(tmp), control=False)
        async with build_node(config) as node:
            peer = await node.connect(args.peer, timeout=args.timeout)
            reply = await node.rpc.call(peer, "hello.greet", {"name": args.name}, timeout=args.timeout)
    return f"{inert(reply['greeting'])} (from {inert(reply['from'])})"
