"""bench/crdt: replicated documents across `lattice-node` processes on 127.0.0.1.

    python bench/crdt.py [--nodes 8] [--writes 1000] [--probes 20]

Each daemon opens one document; every node writes --writes distinct keys at once (the `crdt.fill`
control op: the daemon itself makes one signed, fsynced update per key). Figures (JSON lines):
- converge_s: from the first write until every node holds all nodes x writes keys, and identical;
- applied_per_s_per_node: remote updates each node applied / converge_s (median over nodes);
- propagation_ms: one write on node 0 until every other node shows it (median of --probes; polled
  every 2 ms through the control sockets, so it includes up to ~2 ms of polling);
- local_write_ms: one `crdt.set` round trip through the control socket (write + fsync + reply).
No anchor offers a CRDT (notes/anchors.md), so there is no anchor line; the baseline is the local
write itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from lattice.testing.daemons import start_daemon, wait_for

DOC = "bench/doc"


def out(line: dict) -> None:
    print(json.dumps(line), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--writes", type=int, default=1000)
    parser.add_argument("--probes", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lattice-crdt-") as tmp:
        work = Path(tmp)
        first = start_daemon(work, "n0", ["--listen", "/ip4/127.0.0.1/tcp/0"])
        daemons = [first] + [
            start_daemon(
                work, f"n{i}", ["--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", first.info["addrs"][0]]
            )
            for i in range(1, args.nodes)
        ]
        try:
            clients = [d.client() for d in daemons]
            for c in clients:
                c.call("crdt.get", doc=DOC)  # open: from now on it replicates
            wait_for(lambda: all(len(c.call("peers")) >= 1 for c in clients), 10, "connections")
            time.sleep(1.0)  # let every pair identify each other

            local = []
            for i in range(50):
                t = time.perf_counter()
                clients[0].call("crdt.set", doc=DOC, key=f"warm{i}", value=i)
                local.append((time.perf_counter() - t) * 1000)
            out({"bench": "crdt", "metric": "local_write_ms", "median": round(statistics.median(local), 3)})
            expected = 50
            wait_for(
                lambda: all(len(c.call("crdt.get", doc=DOC)) == expected for c in clients), 30, "warm-up"
            )

            probes = []
            for i in range(args.probes):
                key = f"probe{i}"
                t = time.perf_counter()
                clients[0].call("crdt.set", doc=DOC, key=key, value=i)
                pending = set(range(1, len(clients)))
                deadline = t + 10
                while pending and time.perf_counter() < deadline:
                    pending = {j for j in pending if key not in clients[j].call("crdt.get", doc=DOC)}
                    time.sleep(0.002)
                if not pending:
                    probes.append((time.perf_counter() - t) * 1000)
            expected += args.probes
            out({"bench": "crdt", "metric": "propagation_ms", "median": round(statistics.median(probes), 2)
                 if probes else None, "ok": len(probes), "probes": args.probes, "nodes": args.nodes,
                 "target": "<= 100"})  # fmt: skip

            before = [c.call("crdt.status")["applied"] for c in clients]
            start = time.perf_counter()

            def writer(i: int) -> None:  # the daemon writes itself: the driver is not the bottleneck
                with daemons[i].client() as c:
                    c.call("crdt.fill", doc=DOC, count=args.writes, prefix=f"n{i}-")

            threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(daemons))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wrote = time.perf_counter() - start
            expected += args.nodes * args.writes
            states: list[dict] = []

            def converged() -> bool:
                states[:] = [c.call("crdt.get", doc=DOC) for c in clients]
                return all(len(s) == expected for s in states)

            ok = True
            try:
                wait_for(converged, 300, "convergence", interval=0.1)
            except TimeoutError:
                ok = False
            took = time.perf_counter() - start
            identical = ok and all(s == states[0] for s in states)
            after = [c.call("crdt.status")["applied"] for c in clients]
            rates = [(a - b) / took for a, b in zip(after, before, strict=True)]
            line = {"bench": "crdt", "metric": "converge_s", "median": round(took, 2), "identical": identical}
            out({**line, "converged": ok, "keys": expected, "writes_s": round(wrote, 2), "nodes": args.nodes})
            rate = round(statistics.median(rates))
            out({"bench": "crdt", "metric": "applied_per_s_per_node", "median": rate, "target": ">= 2000"})
            for c in clients:
                c.close()
        finally:
            for d in daemons:
                d.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
