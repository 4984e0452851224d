"""Command-line options of a run and the experiment Config they make (shared by ``sim`` and
``peer``, and by the benches). No torch at import: `lattice-node` builds these options to list them."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from lattice.apps.gossip_sgd.hyper import ALGORITHMS, Hyper

__all__ = ["add_config_args", "config_from", "hyper_from", "warn_unstable"]


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--algorithm", default="dsgt", choices=ALGORITHMS)
    p.add_argument("--peers", type=int, default=16)
    p.add_argument("--topology", default="ring")
    p.add_argument("--degree", type=int, default=4)
    p.add_argument("--split", default="dirichlet", choices=("dirichlet", "label-skew"))
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument(
        "--time-budget",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="peer: stop the run a few rounds after the first round that ends past SECONDS on the run's "
        "clock (since its first member joined), --rounds at most; every peer stops after the same round",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data", dest="dataset", metavar="DIR", default=None, help="directory of the Fashion-MNIST IDX files"
    )
    p.add_argument("--train-limit", type=int, default=0)
    p.add_argument("--test-limit", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument(
        "--model",
        default="mlp",
        help="mlp (784-200-200-10), mlp:WIDTH (784-WIDTH-WIDTH-10) or cnn (a small CNN)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda, cuda:N, or auto (cuda when present, else cpu); default cpu",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"hyper-parameter override, e.g. --set lr=0.05 --set codec_x=topk:0.1 "
        f"(keys: {', '.join(f.name for f in dataclasses.fields(Hyper))})",
    )


def hyper_from(overrides: list[str], base: Hyper | None = None) -> Hyper:
    """``base`` (default Hyper()) with ``KEY=VALUE`` overrides; a bad one is a ConfigError."""
    from lattice.errors import ConfigError

    hp = dataclasses.replace(base or Hyper())
    names = {f.name for f in dataclasses.fields(Hyper)}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in names:
            raise ConfigError(f"unknown hyper-parameter {key!r} (known: {', '.join(sorted(names))})")
        try:
            setattr(hp, key, _typed(value, getattr(hp, key)))
        except ValueError:
            raise ConfigError(f"--set {item}: {value!r} is not a {type(getattr(hp, key)).__name__}") from None
    return hp


def _typed(value: str, current: object) -> object:
    """``value`` as the type of the ``current`` value of the hyper-parameter ("none": None)."""
    if value in ("none", "None", ""):
        return None
    if isinstance(current, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    return value


def config_from(args: argparse.Namespace):
    from lattice.apps.gossip_sgd.experiment import Config

    names = {f.name for f in dataclasses.fields(Config)} - {"hp", "data_dir"}  # data_dir: the node's
    values = {k: v for k, v in vars(args).items() if k in names}
    return Config(**values, data_dir=args.dataset, hp=hyper_from(args.set))


def warn_unstable(cfg: Any) -> None:
    """Say so (stderr) when the settings are known to diverge on this topology."""
    from lattice.apps.gossip_sgd.hyper import stability_warning

    text = stability_warning(cfg.hp, cfg.algorithm, cfg.topology, cfg.peers, cfg.degree, cfg.seed)
    if text:
        print(f"warning: {text}", file=sys.stderr, flush=True)
