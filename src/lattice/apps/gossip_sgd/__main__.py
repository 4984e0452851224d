"""``python -m lattice.apps.gossip_sgd``: simulate (sim) or join a real run as one peer (peer).

    python -m lattice.apps.gossip_sgd sim --algorithm dsgt --peers 16 --rounds 100 \\
        --log runs/dsgt.jsonl --plots runs/
    python -m lattice.apps.gossip_sgd peer --run demo --peers 8 --bootstrap /ip4/127.0.0.1/tcp/4001/p2p/...
"""

from __future__ import annotations

import argparse
import json
import sys

from lattice.apps.gossip_sgd.options import add_config_args, config_from


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
