"""CLI commands and ``run`` options for swarms: ``testnet``, ``top``, ``--join``, roles, metrics.

cli.py calls :func:`register` and :func:`add_run_options` (one hook each) so the swarm features
live here, not in the shared CLI module.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_run_options", "register", "run_overrides"]


def add_run_options(run: argparse.ArgumentParser) -> None:
    group = run.add_argument_group("swarm")
    group.add_argument(
        "--bootstrap-node", action="store_true", default=None,
        help="public bootstrap node: high connection limits, always reachable, no relay reservations",
    )  # fmt: skip
    group.add_argument("--join", metavar="SWARM", help="join this swarm (a built-in or --swarm-file profile)")
    group.add_argument("--swarm-file", metavar="FILE", help="TOML file of [swarm.NAME] profiles")


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """NodeConfig overrides from the options added by :func:`add_run_options`."""
    if args.join:
        from lattice.errors import ConfigError
        from lattice.swarm.profiles import resolve

        profile = resolve(args.join, Path(args.swarm_file) if args.swarm_file else None)
        if not (profile.bootstrap or args.bootstrap or args.bootstrap_node):
            raise ConfigError(
                f"swarm {args.join!r} lists no bootstrap peers yet: give --bootstrap ADDR "
                "or a --swarm-file with its bootstrap list"
            )
    return {"bootstrap_node": args.bootstrap_node, "swarm": args.join, "swarm_file": args.swarm_file}


def register(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add the swarm subcommands to the CLI's subparsers; returns {command: handler}."""
    testnet = sub.add_parser(
        "testnet",
        help="run a local testnet of N daemons",
        description="Start N daemons on 127.0.0.1 around one bootstrap node; Ctrl-C stops them all.",
    )
    testnet.add_argument("--nodes", type=int, default=4, metavar="N", help="number of daemons (default 4)")
    testnet.add_argument("--dir", metavar="DIR", help="directory for the nodes' state (default: a temp dir)")
    testnet.add_argument(
        "--no-wait-dht", dest="wait_dht", action="store_false",
        help="do not wait until every node has the others in its DHT",
    )  # fmt: skip
    testnet.add_argument("--json", action="store_true", help="print one JSON summary line")
    testnet.add_argument(
        "node_args", nargs=argparse.REMAINDER, metavar="-- RUN_ARGS", help="extra `run` options per node"
    )
    return {"testnet": cmd_testnet}


def cmd_testnet(args: argparse.Namespace) -> int:
    from lattice.swarm.testnet import run_foreground

    extra = [a for a in args.node_args if a != "--"]
    if args.dir:
        return run_foreground(Path(args.dir).absolute(), args.nodes, extra, args.wait_dht, args.json)
    with tempfile.TemporaryDirectory(prefix="lattice-testnet-") as tmp:
        return run_foreground(Path(tmp), args.nodes, extra, args.wait_dht, args.json)
