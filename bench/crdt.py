"""bench/crdt: replicated documents across `lattice-node` processes on 127.0.0.1.

    python bench/crdt.py [--nodes 8] [--writes 1000] [--probes 20]
    python bench/crdt.py --scenario sigkill [--runs 5]       # durability under SIGKILL
    python bench/crdt.py --scenario rogue [--runs 5]         # a rogue peer attacking two daemons
    python bench/crdt.py --scenario partition [--runs 5] [--partition 30]   # 4|4 split, heal (root)

Each daemon opens one document; every node writes --writes distinct keys at once (the `crdt.fill`
control op: the daemon itself makes one signed update per key, all durable before it replies).
Figures (JSON lines):
- converge_s: from the first write until every node holds every update (version vectors, polled
  every 50 ms), then checked: all maps identical with all nodes x writes keys;
- applied_per_s_per_node: remote updates each node applied / converge_s (median over nodes);
- cpu_us_per_applied: CPU time of all daemons during that phase / all remote updates applied (a
  figure that a busy machine distorts less than the wall-clock ones);
- propagation_ms: one write on node 0 until every other node shows it (median of --probes; polled
  every 2 ms through the control sockets, so it includes up to ~2 ms of polling);
  A writer's updates share fsyncs (group commit), each durable before it leaves the node; a
  writer that waits for each acknowledgement is bound by fsync latency instead (local_write_ms);
- local_write_ms: one `crdt.set` round trip through the control socket (write + fsync + reply).
No anchor offers a CRDT (notes/anchors.md), so there is no anchor line; the baseline is the local
write itself.

Other scenarios (tests/crdt_scenarios.py; medians over --runs):
- sigkill: 4 control clients write 1,000 keys to one daemon, SIGKILLed after 300 acknowledgements,
  restarted: lost_acked (must be 0), restart_open_s (restart to the document served; baseline: a
  fresh daemon with an empty document, fresh_open_s);
- rogue: a rogue libp2p host sends forged/unauthorized/oversized/garbage/wrong-doc updates to two
  daemons while the owner writes 200 keys: changed (must be false), rejections counted, catch-up;
- partition: 8 daemons in network namespaces, split 4|4 by nftables for --partition seconds with
  100 writes per node on both sides, healed: heal_to_identical_s (target <= 2), heal_to_full_mesh_s;
  the baseline is side_converged_s, the same writes converging inside each connected half.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # crdt_scenarios, attacks

DOC = "bench/doc"


def out(line: dict) -> None:
    print(json.dumps(line), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--writes", type=int, default=1000)
    parser.add_argument("--probes", type=int, default=20)
    scenarios = ["converge", "sigkill", "rogue", "partition"]
    parser.add_argument("--scenario", choices=scenarios, default="converge")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--partition", type=float, default=30.0, help="seconds of partition")
    args = parser.parse_args()
    if args.scenario != "converge":
        return scenario(args)
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
            cpu_before = _cpu_seconds(daemons)
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

            def converged() -> bool:  # every node holds every update (cheap: version vectors only)
                versions = [c.call("crdt.status")["docs"][DOC]["version"] for c in clients]
                return all(sum(v.values()) == expected for v in versions)

            ok = True
            try:
                wait_for(converged, 300, "convergence", interval=0.05)
            except TimeoutError:
                ok = False
            took = time.perf_counter() - start
            states = [c.call("crdt.get", doc=DOC) for c in clients]  # one update per key: compare
            identical = ok and all(s == states[0] and len(s) == expected for s in states)
            after = [c.call("crdt.status")["applied"] for c in clients]
            cpu = _cpu_seconds(daemons) - cpu_before
            rates = [(a - b) / took for a, b in zip(after, before, strict=True)]
            line = {"bench": "crdt", "metric": "converge_s", "median": round(took, 2), "identical": identical}
            out({**line, "converged": ok, "keys": expected, "writes_s": round(wrote, 2), "nodes": args.nodes})
            rate = round(statistics.median(rates))
            out({"bench": "crdt", "metric": "applied_per_s_per_node", "median": rate, "target": ">= 2000"})
            total = sum(after) - sum(before)
            per = round(cpu / max(total, 1) * 1e6, 1)
            out({"bench": "crdt", "metric": "cpu_us_per_applied", "value": per, "cpu_s": round(cpu, 2),
                 "applied": total})  # fmt: skip
            for c in clients:
                c.close()
        finally:
            for d in daemons:
                d.stop()
    return 0


def _cpu_seconds(daemons: list) -> float:
    import psutil

    total = 0.0
    for d in daemons:
        times = psutil.Process(d.proc.pid).cpu_times()
        total += times.user + times.system
    return total


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def scenario(args: argparse.Namespace) -> int:
    import crdt_scenarios as cs

    rows = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix=f"lattice-crdt-{args.scenario}-") as tmp:
            work = Path(tmp)
            if args.scenario == "sigkill":
                row = cs.sigkill_during_writes(work, writes=1000, writers=4, kill_after=300)
            elif args.scenario == "rogue":
                r = cs.rogue_attack(work, rounds=5, honest_writes=200)
                docs = r["status_b"]["docs"]
                row = {
                    "changed": not (r["owned_b"] == r["owned_a"] == r["expected_owned"]),
                    "sent": sum(v for k, v in r["sent"][0].items() if k != "identities"),
                    "identities": r["sent"][0].get("identities", 1),
                    "rogue_exit": r["rogue_exit"],
                    "rejected_docs": sum(
                        v for d in docs.values() for k, v in d.items() if k.startswith("rejected")
                    ),
                    "rejected_service": r["status_b"]["rejected"],
                    "bad_frames": r["status_b"]["bad_frames"],
                    "catch_up_s": r["catch_up_s"],
                }
            else:
                row = cs.partition_heal(work, nodes=8, partition_s=args.partition, writes=100)
        rows.append(row)
        out({"bench": "crdt", "scenario": args.scenario, "run": run, **row})
    if args.scenario == "sigkill":
        out({"bench": "crdt", "metric": "sigkill_lost_acked", "max": max(r["lost_acked"] for r in rows),
             "acked_median": _median(rows, "acked"), "restart_open_s": _median(rows, "restart_open_s"),
             "baseline_fresh_open_s": _median(rows, "fresh_open_s"),
             "runs": len(rows), "target": "0 lost"})  # fmt: skip
    elif args.scenario == "rogue":
        out({"bench": "crdt", "metric": "rogue_changed", "any": any(r["changed"] for r in rows),
             "rejected_median": _median(rows, "rejected_docs"), "catch_up_s": _median(rows, "catch_up_s"),
             "runs": len(rows), "target": "nothing changes"})  # fmt: skip
    else:
        out({"bench": "crdt", "metric": "partition_heal_s", "median": _median(rows, "heal_to_identical_s"),
             "max": max((r["heal_to_identical_s"] or 1e9) for r in rows),
             "full_mesh_s": _median(rows, "heal_to_full_mesh_s"), "baseline_side_converge_s":
             _median(rows, "side_converged_s"), "partition_s": args.partition, "runs": len(rows),
             "identical": all(r["identical_maps"] for r in rows), "target": "<= 2"})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
