"""``python -m lattice.apps.gossip_sgd``: simulate (sim) or join a real run as one peer (peer).

    python -m lattice.apps.gossip_sgd sim --algorithm dsgt --peers 16 --rounds 100 \\
        --log runs/dsgt.jsonl --plots runs/
    python -m lattice.apps.gossip_sgd peer --run demo --peers 8 --bootstrap /ip4/127.0.0.1/tcp/4001/p2p/...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from lattice.apps.gossip_sgd.algorithms import ALGORITHMS, Hyper


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--algorithm", default="dsgt", choices=ALGORITHMS)
    p.add_argument("--peers", type=int, default=16)
    p.add_argument("--topology", default="ring")
    p.add_argument("--degree", type=int, default=4)
    p.add_argument("--split", default="dirichlet", choices=("dirichlet", "label-skew"))
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", dest="data_dir", default=None, help="directory of the Fashion-MNIST IDX files")
    p.add_argument("--train-limit", type=int, default=0)
    p.add_argument("--test-limit", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"hyper-parameter override, e.g. --set lr=0.05 --set codec_x=topk:0.1 "
        f"(keys: {', '.join(f.name for f in dataclasses.fields(Hyper))})",
    )


def hyper_from(overrides: list[str], base: Hyper | None = None) -> Hyper:
    hp = dataclasses.replace(base or Hyper())
    types = {f.name: f.type for f in dataclasses.fields(Hyper)}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"unknown hyper-parameter {key!r}")
        current = getattr(hp, key)
        if value in ("none", "None", ""):
            setattr(hp, key, None)
        elif isinstance(current, bool):
            setattr(hp, key, value.lower() in ("1", "true", "yes"))
        elif isinstance(current, int):
            setattr(hp, key, int(value))
        elif isinstance(current, float):
            setattr(hp, key, float(value))
        else:
            setattr(hp, key, value)
    return hp


def config_from(args: argparse.Namespace):
    from lattice.apps.gossip_sgd.experiment import Config

    names = {f.name for f in dataclasses.fields(Config)} - {"hp"}
    return Config(**{k: v for k, v in vars(args).items() if k in names}, hp=hyper_from(args.set))


def cmd_sim(args: argparse.Namespace) -> int:
    from lattice.apps.gossip_sgd import plots
    from lattice.apps.gossip_sgd.experiment import json_line, simulate

    cfg = config_from(args)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lattice.apps.gossip_sgd", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sim = sub.add_parser("sim", help="all peers in this process")
    add_config_args(sim)
    sim.add_argument("--log", help="append one JSON line per evaluation to this file")
    sim.add_argument("--plots", help="write accuracy PNGs (vs rounds, vs bytes) into this directory")
    sim.add_argument(
        "--no-progress", dest="progress", action="store_false", help="JSON lines instead of a bar"
    )
    sim.set_defaults(fn=cmd_sim)
    try:
        from lattice.apps.gossip_sgd import network

        network.add_cli(sub, add_config_args)
    except ImportError:
        pass
    args = parser.parse_args(argv)
    from lattice.apps.gossip_sgd.data import DatasetMissing

    try:
        return args.fn(args)
    except DatasetMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
