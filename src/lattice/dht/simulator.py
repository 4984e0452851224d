"""An in-process Kademlia network for research and tests: thousands of nodes, churn, hop counts.

It runs the same RoutingTable and Lookup code as the networked DHT, with requests answered by
function calls instead of streams. Routing tables are filled as a long-running network would have
them (each bucket holds up to k live random peers of its prefix range), then a fraction of nodes is
killed without telling anyone (their entries stay in others' tables and time out when queried).

    python -m lattice.dht.simulator --nodes 10000 --lookups 2000 --churn 0.3
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import statistics
import time
from dataclasses import dataclass

from lattice.dht.keys import ID_BITS
from lattice.dht.lookup import Lookup


@dataclass
class SimResult:
    nodes: int
    lookups: int
    churn: float
    median_hops: float
    p99_hops: int
    success: float
    median_queries: float
    seconds: float

    def as_dict(self) -> dict:
        return self.__dict__ | {"hop_target": round(_log2(self.nodes) / 2, 2)}


def _log2(n: int) -> float:
    import math

    return math.log2(n)


class SimNetwork:
    def __init__(self, n: int, k: int = 20, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.k = k
        self.ids = sorted(self.rng.getrandbits(ID_BITS) for _ in range(n))
        self.alive = set(self.ids)
        self.tables: dict[int, list[list[int]]] = {}
        for node in self.ids:
            self.tables[node] = self._fill(node)

    def _range(self, lo: int, hi: int) -> list[int]:
        return self.ids[bisect.bisect_left(self.ids, lo) : bisect.bisect_left(self.ids, hi)]

    def _fill(self, node: int) -> list[list[int]]:
        """Bucket i: peers sharing exactly (255 - i) prefix bits with ``node``; up to k of them."""
        buckets = []
        for i in range(ID_BITS):
            lo = ((node >> (i + 1)) << (i + 1)) | ((~node >> i & 1) << i) if i < ID_BITS else 0
            hi = lo + (1 << i)
            members = self._range(lo, hi)
            if len(members) > self.k:
                members = self.rng.sample(members, self.k)
            buckets.append(members)
        return buckets

    def closest_known(self, node: int, target: int, count: int) -> list[int]:
        peers = [p for b in self.tables[node] for p in b]
        peers.sort(key=lambda p: p ^ target)
        return peers[:count]

    def kill(self, fraction: float) -> None:
        victims = self.rng.sample(self.ids, int(len(self.ids) * fraction))
        self.alive -= set(victims)

    def true_closest(self, target: int, alive_only: bool = True) -> int:
        pool = self.alive if alive_only else self.ids
        return min(pool, key=lambda p: p ^ target)

    def lookup(self, origin: int, target: int, alpha: int = 3) -> Lookup:
        seeds = [(p, p) for p in self.closest_known(origin, target, self.k)]
        look = Lookup(target, seeds, k=self.k, alpha=alpha)
        for _ in range(10_000):  # bounded: a lookup touches at most a few hundred peers
            batch = look.next_queries()
            if not batch:  # queries are answered synchronously: nothing to ask means finished
                break
            for peer in batch:  # answered synchronously: a round of alpha parallel queries
                if peer in self.alive:
                    look.on_response(peer, [(p, p) for p in self.closest_known(peer, target, self.k)])
                else:
                    look.on_failure(peer)
            if look.done:
                break
        return look


def run(
    nodes: int, lookups: int, churn: float = 0.0, k: int = 20, alpha: int = 3, seed: int = 0
) -> SimResult:
    start = time.perf_counter()
    net = SimNetwork(nodes, k=k, seed=seed)
    if churn:
        net.kill(churn)
    rng = random.Random(seed + 1)
    live = sorted(net.alive)
    hops, queries, found = [], [], 0
    for _ in range(lookups):
        origin = rng.choice(live)
        target = rng.getrandbits(ID_BITS)
        look = net.lookup(origin, target, alpha)
        hops.append(look.hops)
        queries.append(look.queries)
        best = look.closest(1)
        found += bool(best) and best[0] == net.true_closest(target)
    hops.sort()
    return SimResult(
        nodes,
        lookups,
        churn,
        statistics.median(hops),
        hops[int(len(hops) * 0.99) - 1],
        found / lookups,
        statistics.median(queries),
        round(time.perf_counter() - start, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--churn", type=float, default=0.0, help="fraction of nodes killed silently")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--alpha", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = run(args.nodes, args.lookups, args.churn, args.k, args.alpha, args.seed)
    print(json.dumps({"bench": "dht-sim", **result.as_dict()}))


if __name__ == "__main__":
    main()
