"""The app's door into lattice-node: ``APP``, named by the ``lattice.apps`` entry point.

lattice-node loads this module to list or run app commands, so it imports nothing heavy: the service
and the command's node are imported when they are used.
"""

from __future__ import annotations

import argparse
from typing import Any

from lattice.cli import add_node_options
from lattice.plugins import App, Command


def add_commands(sub: Any, commands: dict[str, Command]) -> None:
    """`lattice-node hello MULTIADDR`: greet the peer at MULTIADDR from a short-lived node."""
    hello = sub.add_parser(
        "hello",
        help="greet a peer that runs the hello app (example app)",
        description="Start a short-lived node, call hello.greet on the peer at MULTIADDR, print the answer.",
    )
    hello.add_argument("peer", metavar="MULTIADDR", help="address of a node started with --app hello")
    hello.add_argument("--name", default="world", help="who says hello (default: world)")
    hello.add_argument("--timeout", type=float, default=10.0, help="seconds for the whole call")
    add_node_options(hello)  # --bootstrap, --join, --key, ... exactly as `lattice-node run`
    commands["hello"] = cmd_hello


def services(config: Any) -> list[Any]:
    """What runs inside a node started with `--app hello` (or ``apps = ["hello"]``)."""
    from lattice_hello.service import HelloService

    return [HelloService()]


def cmd_hello(args: argparse.Namespace) -> int:
    import trio

    from lattice_hello.client import greet

    print(trio.run(greet, args))
    return 0


APP = App(
    name="hello",
    description="example app: hello.greet over the tensor RPC",
    add_commands=add_commands,
    services=services,
)
