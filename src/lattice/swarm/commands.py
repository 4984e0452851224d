"""CLI commands and ``run`` options for swarms: ``testnet``, ``top``, ``--join``, roles, metrics.

cli.py calls :func:`register` and :func:`add_run_options` (one hook each) so the swarm features
live here, not in the shared CLI module.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lattice.plugins import OptionGroup

__all__ = ["add_run_options", "register", "run_overrides"]


def add_run_options(run: OptionGroup) -> None:
    group = run.add_argument_group("swarm")
    group.add_argument(
        "--bootstrap-node", action="store_true", default=None,
        help="public bootstrap node: high connection limits, always reachable, no relay reservations",
    )  # fmt: skip
    group.add_argument("--join", metavar="SWARM", help="join this swarm (a built-in or --swarm-file profile)")
    group.add_argument("--swarm-file", metavar="FILE", help="TOML file of [swarm.NAME] profiles")
    obs = run.add_argument_group("observability")
    obs.add_argument(
        "--metrics-listen", metavar="HOST:PORT",
        help="serve /metrics (Prometheus), /api/state and the web page, e.g. 127.0.0.1:9090 (off by default)",
    )  # fmt: skip
    obs.add_argument("--log-format", choices=["text", "json"], help="log lines as text (default) or JSON")


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
    return {
        "bootstrap_node": args.bootstrap_node, "swarm": args.join, "swarm_file": args.swarm_file,
        "metrics_listen": args.metrics_listen, "log_format": args.log_format,
    }  # fmt: skip


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
        help="do not wait until every node has min(20, N-1) DHT contacts (enough to find every other)",
    )  # fmt: skip
    testnet.add_argument("--json", action="store_true", help="print one JSON summary line")
    testnet.add_argument(
        "node_args", nargs=argparse.REMAINDER, metavar="-- RUN_ARGS", help="extra `run` options per node"
    )
    top = sub.add_parser(
        "top", help="live view of a running daemon", description="Peers, traffic, DHT, RPC, CRDT, limits."
    )
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("--count", type=int, help="stop after N refreshes (default: until Ctrl-C)")
    top.add_argument(
        "--control", metavar="SOCKET", help="control socket of the daemon (default: from config)"
    )
    top.add_argument("--config", metavar="FILE", help="TOML config file (to find the control socket)")
    top.add_argument("--json", action="store_true", help="print one metrics snapshot as JSON")
    bans = sub.add_parser(
        "bans", help="list, impose or lift bans", description="Peers and IPs banned by the daemon's limits."
    )
    bans.add_argument("--ban", metavar="PEER_ID", help="ban this peer (and its IP) now")
    bans.add_argument("--seconds", type=float, help="how long (default: the swarm's ban_seconds)")
    bans.add_argument("--unban", metavar="PEER_ID|IP", help="lift a ban")
    bans.add_argument("--control", metavar="SOCKET", help="daemon's control socket")
    bans.add_argument("--config", metavar="FILE", help="TOML config file (to find the control socket)")
    bans.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return {"testnet": cmd_testnet, "top": cmd_top, "bans": cmd_bans}


def cmd_bans(args: argparse.Namespace) -> int:
    import json

    from lattice.config import NodeConfig
    from lattice.control.client import Client
    from lattice.errors import ConfigError
    from lattice.identity import PeerId
    from lattice.observe.inert import inert  # reasons and protocol names may quote a remote peer

    if args.seconds is not None and not 0 < args.seconds <= 10 * 365 * 86400:
        raise ConfigError("--seconds must be positive (at most ten years)")
    if args.ban:
        PeerId.from_string(args.ban)  # a clear error before contacting the daemon
    path = args.control or NodeConfig.load(args.config).control_path
    with Client(path) as client:
        if args.ban:
            client.call("limits.ban", peer=args.ban, seconds=args.seconds)
        if args.unban and not client.call("limits.unban", target=args.unban):
            raise ConfigError(f"{args.unban} is not banned")
        status = client.call("limits.bans")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    rows = [(p, s, status["ban_reasons"].get(p, "")) for p, s in status["banned_peers"].items()]
    rows += [(ip, s, "") for ip, s in status["banned_ips"].items()]
    for target, left, reason in rows:
        print(f"{inert(target)}\t{left:.0f} s left\t{inert(reason)}")
    if not rows:
        print("(no bans)")
    throttled = ", ".join(f"{inert(k)} {v}" for k, v in status["throttled"].items()) or "none"
    print(f"bans so far {status['bans_total']}, refused connections {status['refused_connections']}, "
          f"throttled: {throttled}")  # fmt: skip
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    import json

    from lattice.config import NodeConfig
    from lattice.control.client import Client
    from lattice.errors import ConfigError
    from lattice.observe.top import run_top

    if not 0.1 <= args.interval <= 3600:
        raise ConfigError("--interval must be between 0.1 and 3600 seconds")
    path = args.control or NodeConfig.load(args.config).control_path
    with Client(path) as client:
        if args.json:
            print(json.dumps(client.call("metrics"), indent=2, default=str))
            return 0
        try:
            run_top(client, args.interval, args.count)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_testnet(args: argparse.Namespace) -> int:
    from lattice.swarm.testnet import run_foreground

    extra = [a for a in args.node_args if a != "--"]
    if args.dir:
        return run_foreground(Path(args.dir).absolute(), args.nodes, extra, args.wait_dht, args.json)
    with tempfile.TemporaryDirectory(prefix="lattice-testnet-") as tmp:
        return run_foreground(Path(tmp), args.nodes, extra, args.wait_dht, args.json)
