"""Command-line options of a run and the experiment Config they make (shared by ``sim`` and
``peer``, and by the benches)."""

from __future__ import annotations

import argparse
import dataclasses

from lattice.apps.gossip_sgd.algorithms import ALGORITHMS, Hyper

__all__ = ["add_config_args", "config_from", "hyper_from"]


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
