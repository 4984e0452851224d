"""bench/swarm: a local testnet of N daemons: time until all are ready and until every node has
every other one in its DHT routing table.

    python bench/swarm.py [--nodes 16] [--runs 5]

Baseline in the same run: one daemon's spawn-to-ready time (the floor a parallel start can reach
on this machine), so ``ready_s / single_ready_s`` says what starting N in parallel costs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import emit  # noqa: E402

from lattice.swarm.testnet import Testnet  # noqa: E402


def one_run(nodes: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        net = Testnet(Path(tmp), nodes)
        try:
            net.start()
            ready = time.monotonic() - t0
            net.wait_dht(timeout=60)
            return ready, time.monotonic() - t0
        finally:
            net.stop()


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    single = [one_run(1)[0] for _ in range(args.runs)]
    emit("swarm", "lattice testnet", "single_ready_s", single, nodes=1)
    ready, dht = [], []
    for _ in range(args.runs):
        r, d = one_run(args.nodes)
        ready.append(r)
        dht.append(d)
    emit("swarm", "lattice testnet", "all_ready_s", ready, nodes=args.nodes, target_s=10.0)
    emit("swarm", "lattice testnet", "dht_converged_s", dht, nodes=args.nodes, target_s=10.0)


if __name__ == "__main__":
    main()
