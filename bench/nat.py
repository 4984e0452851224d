"""bench/nat: NAT traversal on real Linux NATs (network namespaces, nftables masquerade), repeated.

    python bench/nat.py [--runs 20] [--only cone,symmetric,failover,first,cut]

Needs root (ip netns, nft). Every run builds a fresh testbed (lattice.testing.netns): a public
relay/bootstrap host and two sites, each a router doing masquerade with a `lattice-node` peer behind
it. The peers know only the relay's address. Scenarios:
- cone: both NATs endpoint-independent. Time from starting the two peers' processes until A (given
  only B's peer id) holds a direct connection to B; then 64 MiB up over that direct path. Also the
  reachability each node reports (NATed peers private, the relay public).
- symmetric: B behind a symmetric NAT. Hole punching must fail, and RPC and the DHT must work over
  the relay; `status` must say relayed.
- failover: two relays, B and A behind symmetric NATs; the relay carrying A->B is SIGKILLed; time
  until an RPC call to B succeeds again (through the other relay).
- first: relay, then A and B started at once, cone and symmetric NATs in turn, routers dropping
  what is sent to other private networks (as the internet does); A issues `connect <B's peer id>`
  (10 s timeout, repeated while it fails) the moment it is ready. The longest single call, and
  start to connected.
- cut: as failover, but the relay's link is cut silently (nftables drops its traffic: no FIN/RST);
  time until an RPC call to B succeeds again, and whether `connect` meanwhile claimed a dead path.

Baseline in the same run: plain TCP simultaneous open between the two NATed hosts (the lower bound
of a punch). Prints JSON lines: {"bench": "nat", "scenario", "metric", "median", "p90", "ok", "runs"}.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lattice.testing.daemons import host_addr, peer_args, peer_path, relay_args, start_daemon, wait_for
from lattice.testing.netns import Site, Testbed, netns_unavailable


def out(line: dict) -> None:
    print(json.dumps(line), flush=True)


def summary(scenario: str, metric: str, values: list[float], ok: int, runs: int, **extra) -> None:
    line = {"bench": "nat", "scenario": scenario, "metric": metric, "ok": ok, "runs": runs, **extra}
    if values:
        values = sorted(values)
        line["median"] = round(statistics.median(values), 3)
        line["p90"] = round(values[min(len(values) - 1, int(0.9 * len(values)))], 3)
        line["max"] = round(values[-1], 3)
    out(line)


def start_swarm(tb: Testbed, work: Path, relays: list[str]):
    started = [start_daemon(work, name, relay_args(), tb, name) for name in relays]
    args = peer_args(*(host_addr(tb, r, r.name) for r in started))
    t0 = time.monotonic()
    a = start_daemon(work, "a1", args, tb, "a1")
    b = start_daemon(work, "b1", args, tb, "b1")
    return started, a, b, t0


def connect_by_id(a, b, timeout: float = 10.0) -> None:
    wait_for(lambda: a.call("connect", addr=b.peer_id, timeout=3), timeout, "A reaching B", interval=0.05)


def run_cone(work: Path) -> dict:
    with Testbed(public=["relay"], sites=[Site("a", "cone"), Site("b", "cone")]) as tb:
        (relay,), a, b, t0 = start_swarm(tb, work, ["relay"])
        connect_by_id(a, b)
        t_relayed = time.monotonic() - t0
        wait_for(lambda: peer_path(a, b.peer_id) == "direct", 10, "direct connection")
        t_direct = time.monotonic() - t0
        bench = a.call("rpc.bench", peer=b.peer_id, size=64 << 20, count=3, direction="up")
        wait_for(lambda: a.call("status")["reachability"] == "private", 15, "A private")
        wait_for(lambda: relay.call("status")["reachability"] == "public", 15, "relay public")
        reach_ok = a.call("status")["reachability"] == "private" and b.call("status")["reachability"] in (
            "private", "unknown",
        )  # fmt: skip
        b_private = wait_for(lambda: b.call("status")["reachability"] == "private", 15, "B private")
        return {
            "to_relayed_s": t_relayed,
            "to_direct_s": t_direct,
            "mibs_64": bench["mib_per_s"],
            "reach_ok": bool(reach_ok and b_private),
        }


def run_symmetric(work: Path) -> dict:
    with Testbed(public=["relay"], sites=[Site("a", "cone"), Site("b", "symmetric")]) as tb:
        (_relay,), a, b, t0 = start_swarm(tb, work, ["relay"])
        connect_by_id(a, b)
        t_relayed = time.monotonic() - t0
        echo = a.call("rpc.bench", peer=b.peer_id, size=1 << 20, count=3, direction="up")
        assert b.call("dht.put", key="bench/nat", value=b"x") >= 1
        got = a.call("dht.get", key="bench/nat")
        dht_ok = [e["value"] for e in got] == [b"x"]

        def punch_failed():
            row = next((p for p in b.call("peers") if p["peer_id"] == a.peer_id), None)
            return row and row["hole_punch"] and row["hole_punch"]["outcome"].startswith("failed")

        wait_for(punch_failed, 40, "hole punch given up")
        still_relayed = peer_path(a, b.peer_id) == "relayed" and b.call("status")["relayed_peers"] >= 1
        return {
            "to_relayed_s": t_relayed,
            "relayed_mibs_1": echo["mib_per_s"],
            "ok": dht_ok and still_relayed,
        }


def run_failover(work: Path) -> dict:
    with Testbed(public=["relay", "relay2"], sites=[Site("a", "symmetric"), Site("b", "symmetric")]) as tb:
        relays, a, b, _ = start_swarm(tb, work, ["relay", "relay2"])
        wait_for(lambda: len(b.call("status")["nat"]["relays"]) == 2, 10, "two reservations")
        connect_by_id(a, b)
        a.call("rpc.call", peer=b.peer_id, method="lattice.bench.echo", payload=b"1")
        row = next(p for p in a.call("peers") if p["peer_id"] == b.peer_id)
        via = row["addr"]
        paths = {c["addr"] for c in row["connections"]}  # B may have dialed A too, via another relay
        dead = next(r for r in relays if r.peer_id in via)
        dead.stop(sig=signal.SIGKILL)
        t_kill = time.monotonic()

        def echo() -> bool:
            method = "lattice.bench.echo"
            return a.call("rpc.call", peer=b.peer_id, method=method, payload=b"2", timeout=2) == b"2"

        wait_for(echo, 30, "RPC through the other relay", interval=0.05)
        resumed = time.monotonic() - t_kill
        wait_for(
            lambda: dead.peer_id not in str(b.call("status")["nat"]["relays"]),
            10,
            "B dropping the dead relay",
        )
        return {"resume_s": resumed, "redundant": len(paths) > 1}


def run_first_connect(work: Path, nat: str) -> dict:
    with Testbed(public=["relay"], sites=[Site("a", "cone"), Site("b", nat)]) as tb:
        tb.drop_private()
        relay = start_daemon(work, "relay", relay_args(), tb, "relay")
        args = peer_args(host_addr(tb, relay, "relay"))
        with ThreadPoolExecutor(1) as pool:
            t0 = time.monotonic()
            started_b = pool.submit(start_daemon, work, "b1", args, tb, "b1")
            a = start_daemon(work, "a1", args, tb, "a1")
            b = started_b.result()
        calls = []
        while time.monotonic() - t0 < 30:
            c0 = time.monotonic()
            try:
                a.call("connect", addr=b.peer_id, timeout=10)
            except Exception:  # not findable yet (fails at once): the user tries again
                calls.append(time.monotonic() - c0)
                time.sleep(0.05)
                continue
            calls.append(time.monotonic() - c0)
            return {"nat": nat, "call_max_s": max(calls), "start_to_connected_s": time.monotonic() - t0}
        raise TimeoutError(f"A never connected to B ({len(calls)} calls)")


def run_cut(work: Path) -> dict:
    with Testbed(public=["relay", "relay2"], sites=[Site("a", "symmetric"), Site("b", "symmetric")]) as tb:
        tb.drop_private()
        relays, a, b, _ = start_swarm(tb, work, ["relay", "relay2"])
        wait_for(lambda: len(b.call("status")["nat"]["relays"]) == 2, 10, "two reservations")
        connect_by_id(a, b)
        a.call("rpc.call", peer=b.peer_id, method="lattice.bench.echo", payload=b"1")
        via = next(p for p in a.call("peers") if p["peer_id"] == b.peer_id)["addr"]
        dead = next(r for r in relays if r.peer_id in via)
        tb.cut(dead.name)
        t_cut = time.monotonic()
        claimed_dead = 0  # `connect` answering "connected" while only circuits through the cut relay exist

        def echo() -> bool:
            nonlocal claimed_dead
            a.call("connect", addr=b.peer_id, timeout=2)
            row = next((p for p in a.call("peers") if p["peer_id"] == b.peer_id), None)
            if row is not None and all(dead.peer_id in c["addr"] for c in row["connections"]):
                claimed_dead += 1
            method = "lattice.bench.echo"
            return a.call("rpc.call", peer=b.peer_id, method=method, payload=b"2", timeout=2) == b"2"

        wait_for(echo, 60, "RPC through the other relay", interval=0.05)
        return {"resume_s": time.monotonic() - t_cut, "claimed_dead": claimed_dead}


def run_simultaneous_open() -> float | None:
    """Plain TCP simultaneous open between the two NATed hosts (no libp2p): the floor of a punch."""
    code = """
import socket, sys, time
def fresh():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 5000))
    s.settimeout(0.5)
    return s
s, t = fresh(), time.monotonic()
for i in range(20):
    try:
        s.connect((sys.argv[1], 5000))
        break
    except OSError:
        s.close()
        s = fresh()
print(time.monotonic() - t)
"""
    with Testbed(public=["relay"], sites=[Site("a", "cone"), Site("b", "cone")]) as tb:
        pa = tb.popen("a1", [sys.executable, "-c", code, tb.public_ip("b")], stdout=-1, text=True)
        pb = tb.popen("b1", [sys.executable, "-c", code, tb.public_ip("a")], stdout=-1, text=True)
        try:
            return float(pa.communicate(timeout=15)[0].strip())
        except (ValueError, OSError):
            return None
        finally:
            pb.communicate(timeout=15)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--only", default="cone,symmetric,failover,first,cut")
    args = parser.parse_args()
    why = netns_unavailable()
    if why is not None:
        out({"bench": "nat", "error": f"cannot build the NAT testbed: {why}"})
        return 2
    scenarios = {
        "cone": run_cone, "symmetric": run_symmetric, "failover": run_failover, "cut": run_cut,
        "first": lambda work, i: run_first_connect(work, ("cone", "symmetric")[i % 2]),
    }  # fmt: skip
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    floors = [x for x in (run_simultaneous_open() for _ in range(min(args.runs, 5))) if x is not None]
    summary(
        "baseline", "tcp_simultaneous_open_ms", [f * 1000 for f in floors], len(floors), min(args.runs, 5)
    )
    for name in wanted:
        results, errors = [], []
        for i in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="lattice-nat-") as tmp:
                try:
                    run = scenarios[name]
                    results.append(run(Path(tmp), i) if name == "first" else run(Path(tmp)))
                except Exception as exc:  # one failed run is a data point, not the end of the bench
                    errors.append(f"run {i}: {type(exc).__name__}: {exc}"[:300])
            print(f"# {name} run {i + 1}/{args.runs}: {'ok' if len(results) > i - len(errors) else 'FAILED'}",
                  file=sys.stderr, flush=True)  # fmt: skip
        ok = len(results)
        if name == "cone":
            summary(
                name, "start_to_direct_s", [r["to_direct_s"] for r in results], ok, args.runs, target="<= 3"
            )
            summary(name, "start_to_relayed_s", [r["to_relayed_s"] for r in results], ok, args.runs)
            summary(name, "direct_64mib_up_mibs", [r["mibs_64"] for r in results], ok, args.runs)
            reach = sum(1 for r in results if r["reach_ok"])
            summary(name, "reachability_right", [], reach, args.runs, target="20/20")
        elif name == "symmetric":
            good = sum(1 for r in results if r["ok"])
            summary(name, "relayed_services_ok", [], good, args.runs)
            summary(name, "start_to_relayed_s", [r["to_relayed_s"] for r in results], ok, args.runs)
            summary(name, "relayed_1mib_up_mibs", [r["relayed_mibs_1"] for r in results], ok, args.runs)
        elif name == "first":
            calls = [r["call_max_s"] for r in results]
            summary(name, "connect_call_max_s", calls, ok, args.runs, target="<= 3",
                    stalls=sum(1 for c in calls if c > 3))  # fmt: skip
            summary(name, "start_to_connected_s", [r["start_to_connected_s"] for r in results], ok, args.runs)
        elif name == "cut":
            summary(name, "relay_cut_to_resumed_s", [r["resume_s"] for r in results], ok, args.runs,
                    target="<= 10")  # fmt: skip
            claimed = sum(1 for r in results if r["claimed_dead"])
            summary(name, "connect_claimed_a_dead_circuit", [], claimed, args.runs, target="0")
        else:
            single = [r["resume_s"] for r in results if not r["redundant"]]
            summary(name, "relay_killed_to_resumed_s", [r["resume_s"] for r in results], ok, args.runs,
                    target="<= 10")  # fmt: skip
            summary(name, "resumed_s_when_the_only_path_died", single, len(single), args.runs)
        for error in errors[:5]:
            out({"bench": "nat", "scenario": name, "error": error})
    return 0


if __name__ == "__main__":
    sys.exit(main())
