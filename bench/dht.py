"""bench/dht: a swarm of `lattice-node` processes on 127.0.0.1; anchors' swarms in the same run.

    python bench/dht.py [--nodes 32] [--ops 300] [--no-churn] [--no-anchors]

Each put/get is issued through a random daemon's control socket and timed here, so the figures
include one local control round trip (reported alone as `control_rtt_ms`, the floor). Success: a get
returns exactly the value put. Churn: 30% of the daemons are SIGKILLed at once, then every key is
fetched again (retrying for up to 30 s); reported: fraction retrievable, and the time it took.
Anchors: bench/anchors/run_dht.py (Lattica, hivemind swarms of the same size).
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, ratio, relay_anchor_lines, start_daemon, stop

from lattice import Client

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--ops", type=int, default=300)
    parser.add_argument("--no-churn", action="store_true")
    parser.add_argument("--no-anchors", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    ours = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        first, first_info, _ = start_daemon(work, "n0")
        procs, infos = [first], [first_info]
        with ThreadPoolExecutor(4) as pool:  # start the rest in parallel, all bootstrapping from n0
            boot = first_info["addrs"][0]
            started = list(
                pool.map(lambda i: start_daemon(work, f"n{i}", "--bootstrap", boot), range(1, args.nodes))
            )
        for proc, info, _ in started:
            procs.append(proc)
            infos.append(info)
        try:
            clients = [Client(i["control"], timeout=120) for i in infos]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                sizes = [c.dht.status()["routing_table"] for c in clients]
                if min(sizes) >= min(args.nodes - 1, 20):
                    break
                time.sleep(0.2)
            print(
                json.dumps(
                    {
                        "bench": "dht",
                        "system": "lattice",
                        "nodes": args.nodes,
                        "routing_table_min": min(sizes),
                        "routing_table_median": statistics.median(sizes),
                    }
                )
            )
            ctl = []
            for _ in range(200):
                start = time.perf_counter()
                clients[0].id()
                ctl.append((time.perf_counter() - start) * 1000)
            emit("dht", "control-socket", "control_rtt_ms", ctl)
            keys = [f"bench/{args.seed}/{i}" for i in range(args.ops)]
            put_ms, replicas = [], []
            for key in keys:
                client = rng.choice(clients)
                start = time.perf_counter()
                replicas.append(client.dht.put(key, key.encode(), ttl=600))
                put_ms.append((time.perf_counter() - start) * 1000)
            get_ms, ok = [], 0
            for key in keys:
                client = rng.choice(clients)
                start = time.perf_counter()
                entries = client.dht.get(key, latest=False)
                get_ms.append((time.perf_counter() - start) * 1000)
                ok += bool(entries) and entries[0]["value"] == key.encode()
            half = len(put_ms) // 2  # a fresh swarm settling shows as a slower first half
            halves = {"first_half_median": round(statistics.median(put_ms[:half] or [0]), 3),
                      "second_half_median": round(statistics.median(put_ms[half:] or [0]), 3)}  # fmt: skip
            halves["replicas_median"] = statistics.median(replicas)
            ours["store_ms"] = emit("dht", "lattice", "store_ms", put_ms, target="<= 10", nodes=args.nodes,
                                    **halves)["median"]  # fmt: skip
            phases = clients[0].dht.status()
            put_phases = {k: v for k, v in phases.items() if k.startswith("put_")}
            print(json.dumps({"bench": "dht", "system": "lattice", "put_phases_ewma": put_phases}))
            ours["get_ms"] = emit("dht", "lattice", "get_ms", get_ms, target="<= 5", nodes=args.nodes,
                                  success=ok / len(keys))["median"]  # fmt: skip
            latest_ms = []
            for key in keys[:100]:
                start = time.perf_counter()
                rng.choice(clients).dht.get(key, latest=True)
                latest_ms.append((time.perf_counter() - start) * 1000)
            emit("dht", "lattice", "get_latest_ms", latest_ms, nodes=args.nodes)
            if not args.no_churn:
                victims = rng.sample(range(1, args.nodes), int(args.nodes * 0.3))
                for v in victims:
                    procs[v].send_signal(signal.SIGKILL)
                for v in victims:
                    procs[v].wait()
                alive = [c for i, c in enumerate(clients) if i not in victims]
                start = time.monotonic()
                missing = set(keys)
                while missing and time.monotonic() - start < 30:
                    for key in list(missing):
                        entries = rng.choice(alive).dht.get(key, latest=False)
                        if entries and entries[0]["value"] == key.encode():
                            missing.discard(key)
                emit("dht", "lattice", "churn_retrievable", [1 - len(missing) / len(keys)], target=">= 0.99",
                     killed=len(victims), seconds=round(time.monotonic() - start, 2))  # fmt: skip
            for c in clients:
                c.close()
        finally:
            for proc in procs:
                stop(proc)
    if args.no_anchors:
        return
    driver = HERE / "anchors" / "run_dht.py"
    for line in relay_anchor_lines(driver, 1):
        metric, theirs = line.get("metric"), line.get("median")
        if metric in ours and theirs:
            ratio("dht", metric, ours[metric], line["system"], theirs, higher_is_better=False)


if __name__ == "__main__":
    main()
