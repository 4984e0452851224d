"""``lattice-node gossip-sgd sim|peer`` (and ``python -m lattice.apps.gossip_sgd sim|peer``): simulate a
run with every peer in this process, or take part in a real run as one peer with an embedded node.

    lattice-node gossip-sgd sim --algorithm dsgt --peers 16 --rounds 100 --log runs/dsgt.jsonl --plots runs/
    lattice-node gossip-sgd peer --run demo --peers 8 --out /tmp/p1 --bootstrap /ip4/.../p2p/12D3KooW...

This module is the app's plug-in door (``APP``): it imports no torch, so listing the commands is cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from lattice.apps.gossip_sgd.options import add_config_args, config_from, warn_unstable
from lattice.cli import add_node_options
from lattice.plugins import App, Command

__all__ = ["APP", "add_subcommands", "run_command"]


def register(sub: Any, commands: dict[str, Command]) -> None:
    """Add ``gossip-sgd`` (with its actions sim and peer) to lattice-node's parser."""
    gossip = sub.add_parser(
        "gossip-sgd",
        help="decentralized training: simulate a run (sim) or join one as a peer (peer)",
        description="Gossip SGD: the same algorithms in one process (sim) or over the network (peer).",
    )
    add_subcommands(gossip.add_subparsers(dest="gossip_command", metavar="ACTION", required=True))
    commands["gossip-sgd"] = run_command


def add_subcommands(sub: Any) -> None:
    """The ``sim`` and ``peer`` parsers; each sets ``fn``, the handler :func:`run_command` calls."""
    sim = sub.add_parser(
        "sim", help="all peers in this process", description="Simulate a run in this process."
    )
    add_config_args(sim)
    sim.add_argument("--log", help="append one JSON line per evaluation to this file")
    sim.add_argument("--plots", help="write accuracy PNGs (vs rounds, vs bytes) into this directory")
    sim.add_argument(
        "--no-progress", dest="progress", action="store_false", help="JSON lines instead of a bar"
    )
    sim.set_defaults(fn=cmd_sim)
    peer = sub.add_parser(
        "peer",
        help="one peer process of a real run (embedded node)",
        description="Join run RUN as one peer: a node of its own (options as `lattice-node run`), "
        "data shard by rank, messages over the tensor RPC; writes log.jsonl, model.safetensors and "
        "checkpoint.safetensors in --out.",
    )
    add_config_args(peer)
    add_peer_options(peer)
    peer.set_defaults(fn=cmd_peer)
    plot = sub.add_parser(
        "plot",
        help="plot a set of logs (sim --log files, peers' log.jsonl) into PNGs",
        description="Accuracy against rounds and against bytes sent, one line per log.",
    )
    plot.add_argument("logs", nargs="+", metavar="LOG", help="sim --log files or peers' log.jsonl")
    plot.add_argument("--out", default=".", help="directory for the PNGs (default: here)")
    plot.add_argument("--title", default="")
    plot.set_defaults(fn=cmd_plot)
    fetch = sub.add_parser(
        "fetch-data",
        help="get Fashion-MNIST without root (apt-get download + dpkg-deb -x into ~/.cache)",
        description="Download the Debian package dataset-fashion-mnist and unpack it into a cache "
        "directory (no root needed); prints the directory, which sim and peer then find by themselves.",
    )
    fetch.add_argument("--cache", help="directory to unpack into (default: ~/.cache/lattice/...)")
    fetch.set_defaults(fn=cmd_fetch_data)


def add_peer_options(p: argparse.ArgumentParser) -> None:
    """Options of ``peer``: the run, the node (:func:`lattice.cli.add_node_options`), timing."""
    p.add_argument("--run", required=True, help="run id shared by all peers")
    p.add_argument(
        "--out",
        required=True,
        help="directory for log.jsonl, model.safetensors, checkpoint.safetensors and node data",
    )
    p.add_argument("--addr-file", help="write this node's address here once listening")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a neighbour per phase")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for all peers at the start")
    p.add_argument("--late", action="store_true", help="join a run already in progress")
    p.add_argument(
        "--linger", type=float, default=15.0, help="seconds to keep serving slower peers at the end"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=10,
        metavar="ROUNDS",
        help="write OUT/checkpoint.safetensors every ROUNDS rounds (0: never; default 10)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="restart from OUT/checkpoint.safetensors if there is one (joining the run again, late)",
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress line on a terminal"
    )
    node = p.add_argument_group(
        "node (as `lattice-node run`; default: 127.0.0.1, data in OUT/node, no control)"
    )
    add_node_options(node)


def cmd_fetch_data(args: argparse.Namespace) -> int:
    from lattice.apps.gossip_sgd.data import fetch_fashion_mnist, find_fashion_mnist

    found = None if args.cache else find_fashion_mnist()
    print(found or fetch_fashion_mnist(args.cache))
    return 0


def run_command(args: argparse.Namespace) -> int:
    """Run the action ``args.fn``; a missing dataset or torch is a one-line ConfigError."""
    from lattice.errors import ConfigError

    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigError('gossip SGD needs torch: pip install "lattice-p2p[apps]"') from None
    from lattice.apps.gossip_sgd.data import DatasetMissing

    try:
        return args.fn(args)
    except DatasetMissing as exc:
        raise ConfigError(str(exc)) from None
    except ValueError as exc:  # a bad --model, --split, --topology, schedule... named by the code
        raise ConfigError(str(exc)) from None


def cmd_sim(args: argparse.Namespace) -> int:
    from lattice.apps.gossip_sgd import plots
    from lattice.apps.gossip_sgd.experiment import json_line, simulate

    cfg = config_from(args)
    warn_unstable(cfg)
    log = open(args.log, "a") if args.log else None  # noqa: SIM115
    try:

        def on_record(rec: dict) -> None:
            line = json_line(rec)
            if log:
                log.write(line + "\n")
                log.flush()
            if not args.progress:
                print(line, flush=True)

        records = simulate(cfg, on_record, progress=args.progress)
    finally:
        if log:
            log.close()
    print(json.dumps({"final": records[-1], "config": cfg.as_dict()}))
    if args.plots:
        for path in plots.plot({cfg.algorithm: records}, args.plots, f"{cfg.peers} peers, {cfg.topology}"):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from lattice.apps.gossip_sgd import plots
    from lattice.errors import ConfigError

    missing = [p for p in args.logs if not os.path.isfile(p)]
    if missing:
        raise ConfigError(f"no log file {missing[0]!r}")
    runs = {k: v for k, v in plots.read_runs(args.logs).items() if v}
    if not runs:
        raise ConfigError("no evaluation records in these logs (sim --log, or a peer's log.jsonl)")
    for path in plots.plot(runs, args.out, args.title):
        print(f"wrote {path}")
    return 0


def cmd_peer(args: argparse.Namespace) -> int:
    from lattice.apps.gossip_sgd import peer

    print(json.dumps(peer.run(args)))
    return 0


APP = App(
    name="gossip_sgd",
    description="decentralized training over gossip (gossip-sgd sim|peer)",
    add_commands=register,
)
