"""Simulator table: 16 peers, ring, Fashion-MNIST Dir(0.3), 100 rounds, K=10 gradient steps per round.

Prints one JSON line per algorithm (final average-model / local-model accuracy, consensus distance,
bytes per peer), then a markdown table; writes the per-evaluation log and two PNGs to --out.

    python bench/gossip_sgd_sim.py --out bench/results/gossip_sgd_sim
    python bench/gossip_sgd_sim.py --only cdproxsgt --set codec_x=topk:0.1 --set codec_y=topk:0.1
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from lattice.apps.gossip_sgd import plots
from lattice.apps.gossip_sgd.algorithms import Hyper
from lattice.apps.gossip_sgd.experiment import Config, simulate
from lattice.apps.gossip_sgd.options import hyper_from

# (label, algorithm, hyper-parameter overrides): the notes' reference setup for everyone
RUNS: list[tuple[str, str, list[str]]] = [
    ("dpsgd", "dpsgd", []),
    ("dfedavg", "dfedavg", []),
    ("dfedsam", "dfedsam", ["rho=0.01"]),
    ("dfedsam_mgs", "dfedsam_mgs", ["rho=0.01", "mgs_steps=4"]),
    ("dsgt", "dsgt", []),
    ("dproxsgt", "dproxsgt", ["l1=1e-4"]),
    ("cdproxsgt", "cdproxsgt", ["codec_x=topk:0.1", "codec_y=topk:0.1", "gamma_x=0.5", "gamma_y=0.5"]),
    ("mhd", "mhd", ["heads=3", "public_batch=64"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--peers", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--topology", default="ring")
    ap.add_argument("--only", default="", help="comma-separated labels")
    ap.add_argument("--set", action="append", default=[], help="extra KEY=VALUE for every selected run")
    ap.add_argument("--label-suffix", default="")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/gossip_sgd_sim")
    ap.add_argument("--replot", action="store_true", help="only rebuild table.md and PNGs from --out/*.jsonl")
    args = ap.parse_args()
    if args.replot:
        replot(args.out, f"{args.peers} peers, {args.topology}, Dir({args.alpha}), {args.rounds} rounds")
        return
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    runs, finals = {}, {}
    for label, algorithm, overrides in RUNS:
        if only and label not in only:
            continue
        label = label + args.label_suffix
        hp = hyper_from(overrides + args.set, Hyper())
        cfg = Config(
            algorithm=algorithm,
            peers=args.peers,
            topology=args.topology,
            alpha=args.alpha,
            rounds=args.rounds,
            eval_every=args.eval_every,
            hp=hp,
        )
        started = time.perf_counter()
        records = simulate(cfg)
        for r in records:
            r["label"] = label
        runs[label], finals[label] = records, records[-1]
        with open(os.path.join(args.out, f"{label}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        fig = {"figure": "gossip_sgd_sim", "label": label, "config": cfg.as_dict(), **records[-1]}
        fig["wall_s"] = time.perf_counter() - started
        print(json.dumps(fig), flush=True)
    table = plots.markdown_table(finals)
    print(table)
    with open(os.path.join(args.out, "table.md"), "a") as f:
        f.write(table + "\n\n")
    title = f"{args.peers} peers, {args.topology}, Dir({args.alpha}), {args.rounds} rounds"
    for path in plots.plot(runs, args.out, title):
        print(f"wrote {path}")


def replot(out: str, title: str) -> None:
    order = [label for label, _, _ in RUNS]
    runs = {}
    for name in sorted(os.listdir(out), key=lambda n: (order.index(n[:-6]) if n[:-6] in order else 99, n)):
        if name.endswith(".jsonl"):
            with open(os.path.join(out, name)) as f:
                runs[name[:-6]] = [json.loads(line) for line in f if line.strip()]
    table = plots.markdown_table({label: recs[-1] for label, recs in runs.items()})
    print(table)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"{title}\n\n{table}\n")
    for path in plots.plot(runs, out, title):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
