"""bench/wan: Lattice against plain TCP on emulated wide-area links (lattice.testing.wan), same run.

    python bench/wan.py [--presets lan,metro,continental,intercontinental,mixed] [--runs 3]
                        [--dht-nodes 32[,64]] [--dht-ops 30] [--no-dht] [--no-rpc] [--gib]
                        [--compare-store] [--label NAME] [--anchors lattica,hivemind]
                        [--tcp-mem-max BYTES]

A preset may also be given as NAME=RTT_MS/MBIT[/LOSS], e.g. ``fat=120/400`` (a long fat pipe).
``--tcp-mem-max`` raises the hosts' TCP buffer limits (tcp_rmem/tcp_wmem max; Linux's default
send-buffer limit, 4 MiB, caps one TCP connection at 4 MiB per RTT).

Per preset, one JSON line per figure (medians of --runs), each as a ratio to the link:
- RPC: a 64 MiB tensor a -> b (`rpc.bench`, timed inside daemon a) and a plain TCP transfer of
  64 MiB on the same path, as a fraction of the link rate (1 GiB too with --gib: ~3 min per run at 50 Mbit/s);
- small calls: our 8-byte echo call and a plain TCP 8-byte echo, in link RTTs;
- DHT: put and get through random daemons of a --dht-nodes swarm (each daemon in its own
  namespace), in link RTTs (for `mixed`, the median RTT over all pairs); per operation the new TCP
  connections, retransmitted segments, RTOs and tail-loss probes summed over the swarm's
  namespaces; get also over the non-replicas only (a real lookup); then each record's replicas.
  ``--compare-store`` first runs the swarm with ``dht_store_quorum = 0`` and
  ``dht_warm_connections = 0`` (a put waits for every replica; no warm connections).
With ``--anchors``, Lattica and hivemind in the same testbeds right after ours, each process in a
host of its own (bench/anchors/in_testbed.py runs their loopback bench scripts there), in the same
units: 64 MiB up (Lattica: `rpc_stream` of bytes; hivemind: its MoE tensor path, and its raw byte
stream as ``rpc_up_64mib_raw_link_fraction``), the small call (their unary RPC), and the DHT with
one node per host, a writer host that stores and stays, a reader host that joins after the
stores and gets (so the anchors' gets are lookups: compare them with our ``dht_get_lookup_rtts``).
Needs root (network namespaces, tc, iptables). The machine's load is printed first: the emulated
links are exact, the CPU is not (a 2-core machine shared with other work).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit
from anchors import in_testbed
from anchors._common import CLK_TCK, descendants

from lattice import Client
from lattice.testing.daemons import Daemon, start_daemon, wait_for
from lattice.testing.wan import PRESETS, Preset, WanTestbed, wan_unavailable

MIB = 1 << 20
PORT = 4001
SYSCTLS: dict[str, str] = {}  # set from --tcp-mem-max
ANCHORS: list[str] = []  # set from --anchors
ANCHOR_RPC = {  # the anchors' RPC figures (MiB/s, ms) -> ours (fractions of the link, link RTTs)
    "up_64mib_mibs": "rpc_up_64mib_link_fraction",
    "up_64mib_raw_mibs": "rpc_up_64mib_raw_link_fraction",
    "rtt_ms": "small_call_rtts",
}
REPLICATION_WAIT_S = 10.0  # before counting each key's replicas (request timeouts are 5 s)


def parse_preset(text: str) -> str | Preset:
    """A preset name, or NAME=RTT_MS/MBIT[/LOSS]."""
    if "=" not in text:
        if text not in PRESETS and text != "mixed":
            raise SystemExit(f"unknown preset {text!r}")
        return text
    name, spec = text.split("=", 1)
    parts = [float(x) for x in spec.split("/")]
    return Preset(name, rtt_ms=parts[0], rate_mbit=parts[1], loss=parts[2] if len(parts) > 2 else 0.0)


def _name(preset: str | Preset) -> str:
    return preset if isinstance(preset, str) else preset.name


def start_host(tb: WanTestbed, work: Path, host: str, *extra: str) -> Daemon:
    """A daemon listening on testbed host ``host`` (its own namespace), started with ``extra`` flags."""
    args = ["--listen", f"/ip4/{tb.ip(host)}/tcp/{PORT}", "--log-level", "warning", *extra]
    return start_daemon(work, host, args, testbed=tb, host=host, timeout=60)


def _pair(preset: str | Preset) -> tuple[list[str], str, str]:
    """Hosts of the RPC testbed and the path measured (for `mixed`: a home cable uplink to a cloud)."""
    if preset == "mixed":
        return ["cloud", "lab", "fibre", "cable"], "cable", "cloud"
    return ["a", "b"], "a", "b"


def bench_rpc(preset: str | Preset, runs: int, gib: bool, compare_window: bool = False) -> None:
    hosts, src, dst = _pair(preset)
    with tempfile.TemporaryDirectory() as tmp, WanTestbed(hosts, preset, sysctls=SYSCTLS) as tb:
        rate, rtt = tb.rate_mbit(src, dst), tb.rtt_ms(src, dst)
        where = {"preset": _name(preset), "rate_mbit": rate, "rtt_ms": rtt, **_tuned()}
        if compare_window:  # the same run without window auto-tuning (the window stays 4 MiB)
            fixed = Path(tmp) / "fixed-window.toml"
            fixed.write_text("[node]\nstream_window_max = 4194304\n")
            flags = ("--config", str(fixed))
            _rpc(tb, Path(tmp) / "fixed", src, dst, runs, False, where, "lattice-fixed-4mib-window", flags)
        _rpc(tb, Path(tmp), src, dst, runs, gib, where, "lattice", ())
        tcp, tcp_echo = [], []
        for _ in range(runs):
            p = tb.probe(src, dst, megabytes=64, pings=50)
            tcp.append(p["goodput_mbit"] / rate)
            tcp_echo.append(p["echo_ms"] / rtt)
        emit("wan", "plain-tcp", "rpc_up_64mib_link_fraction", tcp, **where, note="64 MiB, unencrypted")
        emit("wan", "plain-tcp", "small_call_rtts", tcp_echo, **where, note="8-byte echo")
        for system in ANCHORS:
            anchor_rpc(tb, system, src, dst, runs, where)


def anchor_rpc(tb: WanTestbed, system: str, src: str, dst: str, runs: int, where: dict) -> None:
    """An anchor's 64 MiB upload and small call between ``src`` and ``dst``, in our units."""
    rate, rtt = where["rate_mbit"], where["rtt_ms"]
    metrics = [m for m in ANCHOR_RPC if system == "hivemind" or "raw" not in m]
    try:
        lines = in_testbed.rpc(tb, system, src, dst, runs=runs, metrics=metrics, rtt_calls=30, timeout=900)
    except in_testbed.AnchorError as e:
        print(json.dumps({"bench": "wan", "system": system, **where, "error": str(e)[-1000:]}), flush=True)
        return
    version = in_testbed.version(system)
    for line in lines:
        if "error" in line:
            print(json.dumps({"bench": "wan", **line, **where, "version": version}), flush=True)
            continue
        values = line["runs"]
        if line["metric"] == "rtt_ms":
            values = [ms / rtt for ms in values]
        else:
            values = [mibs * MIB * 8 / 1e6 / rate for mibs in values]
        emit("wan", system, ANCHOR_RPC[line["metric"]], values, **where, version=version, path=line["path"])


def _rpc(tb: WanTestbed, work: Path, src: str, dst: str, runs: int, gib: bool, where: dict, system: str,
         flags: tuple[str, ...]) -> None:  # fmt: skip
    """Our figures between daemons in ``src`` and ``dst`` started with ``flags``, as ``system``."""
    rate, rtt = where["rate_mbit"], where["rtt_ms"]
    a = start_host(tb, work, src, "--enable-bench", *flags)
    b = start_host(tb, work, dst, "--enable-bench", *flags)
    try:
        with Client(a.info["control"], timeout=1800) as client:  # long transfers on slow links
            peer = b.info["addrs"][0]
            client.connect(peer)
            sizes = [(64 * MIB, "64mib")] + ([(1 << 30, "1gib")] if gib else [])
            for size, label in sizes:
                r = client.rpc.bench(peer, size, count=runs, direction="up")
                fractions = [size * 8 / t / 1e6 / rate for t in r["times_s"]]
                emit("wan", system, f"rpc_up_{label}_link_fraction", fractions, **where)
            echo = [client.rpc.bench(peer, 8, count=50, direction="echo")["median_s"] for _ in range(runs)]
            emit("wan", system, "small_call_rtts", [t * 1000 / rtt for t in echo], **where)
    finally:
        a.stop()
        b.stop()


TCP_FIGURES = {
    "Tcp": ("ActiveOpens", "RetransSegs"),
    "TcpExt": ("TCPTimeouts", "TCPLossProbes", "TCPSynRetrans"),
}


def tcp_counters(pid: int) -> dict[str, int]:
    """The TCP counters of the network namespace ``pid`` runs in (/proc/PID/net/snmp and netstat):
    connections opened, segments retransmitted, retransmission timeouts, tail-loss probes, SYNs
    retransmitted."""
    out: dict[str, int] = {}
    for name in ("snmp", "netstat"):
        with open(f"/proc/{pid}/net/{name}") as fh:
            lines = fh.read().splitlines()
        for head, values in zip(lines[::2], lines[1::2], strict=False):
            group, _, fields = head.partition(": ")
            for key, value in zip(fields.split(), values.split(": ", 1)[1].split(), strict=False):
                if key in TCP_FIGURES.get(group, ()):
                    out[key] = int(value)
    return out


def swarm_tcp(daemons: list[Daemon]) -> dict[str, int]:
    """TCP counters summed over every daemon's namespace."""
    total: dict[str, int] = {}
    for d in daemons:
        for key, value in tcp_counters(d.proc.pid).items():
            total[key] = total.get(key, 0) + value
    return total


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before.get(key, 0) for key in after}


def _tuned() -> dict[str, str]:
    return {"tcp_wmem": SYSCTLS["net.ipv4.tcp_wmem"]} if SYSCTLS else {}


def bench_dht(preset: str | Preset, nodes: int, ops: int, seed: int, system: str = "lattice",
              node_keys: str = "", replicas: bool = True, anchors: bool = True) -> None:  # fmt: skip
    """Put then get ``ops`` keys through random daemons of a ``nodes`` swarm; ``node_keys``: TOML
    lines for their ``[node]`` table.

    Every testbed host has an address in one /24, where a real wide-area swarm's peers come from
    many prefixes: the daemons exempt each other's addresses from the per-IP and per-prefix caps
    (64 connections per prefix would refuse the 64th peer's connections; node-wide caps stay)."""
    rng = random.Random(seed)
    hosts = [f"n{i}" for i in range(nodes)]
    drivers = ["writer", "reader"] if ANCHORS else []  # the anchors' driver hosts (idle for ours)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, WanTestbed(hosts + drivers, preset, sysctls=SYSCTLS) as tb:
        rtts = [tb.rtt_ms(x, y) for i, x in enumerate(hosts) for y in hosts[i + 1 :]]
        rtt = statistics.median(rtts)
        where = {"preset": _name(preset), "nodes": nodes, "rtt_ms": rtt}
        config = Path(tmp) / "dht.toml"
        exempt = json.dumps(["127.0.0.1", "::1", *(tb.ip(h) for h in hosts)])
        config.write_text(f"[node]\n{node_keys}\n[node.resources]\nexempt_ips = {exempt}\n")
        flags = ("--config", str(config))
        daemons = [start_host(tb, Path(tmp), hosts[0], *flags)]
        boot = daemons[0].info["addrs"][0]
        try:
            with ThreadPoolExecutor(4) as pool:
                daemons += pool.map(
                    lambda h: start_host(tb, Path(tmp), h, "--bootstrap", boot, *flags), hosts[1:]
                )
            clients = [Client(d.info["control"], timeout=120) for d in daemons]
            want = min(nodes - 1, 20)
            try:
                wait_for(lambda: min(c.dht.status()["routing_table"] for c in clients) >= want, 60, "tables")
                wait_for(lambda: all(_warm(c.dht.status()) for c in clients), 60, "warm connections")
            except TimeoutError:
                pass
            status = [c.dht.status() for c in clients]
            setup = {"routing_table_min": min(s["routing_table"] for s in status),
                     "warm_contacts_min": min(s.get("warm_contacts", 0) for s in status),
                     "setup_s": round(time.monotonic() - t0, 1)}  # fmt: skip
            print(json.dumps({"bench": "wan", "system": system, **where, **setup}), flush=True)
            keys = [f"wan/{seed}/{i}" for i in range(ops)]
            put_ms, get_ms, ok, put_tcp, get_tcp, lookup_ms = [], [], 0, [], [], []
            pids, load = [d.proc.pid for d in daemons], round(os.getloadavg()[0], 1)
            cpu0 = _cpu_s(pids)
            for key in keys:
                before = swarm_tcp(daemons)
                start = time.perf_counter()
                rng.choice(clients).dht.put(key, key.encode(), ttl=600)
                put_ms.append((time.perf_counter() - start) * 1000)
                put_tcp.append(_delta(swarm_tcp(daemons), before))
            cpu1 = _cpu_s(pids)
            for key in keys:
                client = rng.choice(clients)
                replica = bool(client.dht.get(key, local=True))  # then the get asks nobody
                before = swarm_tcp(daemons)
                start = time.perf_counter()
                entries = client.dht.get(key, latest=False)
                get_ms.append((time.perf_counter() - start) * 1000)
                get_tcp.append(_delta(swarm_tcp(daemons), before))
                if not replica:
                    lookup_ms.append(get_ms[-1])
                ok += bool(entries) and entries[0]["value"] == key.encode()
            cpu2 = _cpu_s(pids)  # includes the local gets that count replicas (~1 ms each)
            emit("wan", system, "dht_store_rtts", [t / rtt for t in put_ms], **where,
                 median_ms=round(statistics.median(put_ms), 1), load=load,
                 cpu_ms_per_op=round((cpu1 - cpu0) * 1000 / ops, 1),
                 **_tcp_summary(put_ms, put_tcp))  # fmt: skip
            emit("wan", system, "dht_get_rtts", [t / rtt for t in get_ms], **where,
                 median_ms=round(statistics.median(get_ms), 1), success=ok / len(keys), load=load,
                 cpu_ms_per_op=round((cpu2 - cpu1) * 1000 / ops, 1),
                 **_tcp_summary(get_ms, get_tcp))  # fmt: skip
            if lookup_ms:  # the gets from a node that is not a replica: a real lookup
                emit("wan", system, "dht_get_lookup_rtts", [t / rtt for t in lookup_ms], **where,
                     median_ms=round(statistics.median(lookup_ms), 1))  # fmt: skip
            if replicas:  # after the stores' background replication had time to end
                time.sleep(REPLICATION_WAIT_S)
                counts = [replica_count(clients, key) for key in keys]
                emit("wan", system, "dht_replicas", counts, **where, k=20, min=min(counts),
                     below_half_k=sum(c < 10 for c in counts))  # fmt: skip
            for c in clients:
                c.close()
        finally:
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda d: d.stop(), daemons))
        for anchor in ANCHORS if anchors else ():
            anchor_dht(tb, anchor, hosts, ops, seed, where)


def anchor_dht(tb: WanTestbed, system: str, hosts: list[str], ops: int, seed: int, where: dict) -> None:
    """An anchor's DHT store and get (a lookup from a node that joined after the stores) in the
    same testbed, after ours has stopped, in link RTTs."""
    rtt = where["rtt_ms"]
    load = round(os.getloadavg()[0], 1)
    try:
        r = in_testbed.dht(tb, system, hosts, "writer", "reader", ops=ops, tag=f"wan-{seed}", timeout=1200,
                           cpu=_cpu_s)  # fmt: skip
    except in_testbed.AnchorError as e:
        print(json.dumps({"bench": "wan", "system": system, **where, "error": str(e)[-1000:]}), flush=True)
        return
    extra = {**where, "version": in_testbed.version(system), "swarm_up_s": r["swarm_up_s"], "load": load}
    for metric, part in (("dht_store_rtts", "store"), ("dht_get_lookup_rtts", "get")):
        ms = r[f"{part}_ms"]
        cpu_ms = round(r[f"{part}_cpu_s"] * 1000 / len(ms), 1)
        emit("wan", system, metric, [t / rtt for t in ms], **extra, median_ms=round(statistics.median(ms), 1),
             success=r[f"{part}_success"], cpu_ms_per_op=cpu_ms)  # fmt: skip


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds used so far by these processes and their children (utime + stime of the process:
    unlike per-thread figures, it keeps what threads that have exited used)."""
    total = 0
    for pid in {p for root in pids for p in (root, *descendants(root))}:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def _dht_wait_all_cold(preset: str | Preset, nodes: int, ops: int, seed: int, label: str) -> None:
    """The DHT figures with the store waiting for all k replicas and no warm connections."""
    keys = "dht_store_quorum = 0\ndht_warm_connections = 0"
    bench_dht(preset, nodes, ops, seed, f"{label}-wait-all-cold", keys, anchors=False)


def _warm(status: dict) -> bool:
    """Has a daemon connected the routing-table contacts it keeps warm (code without them: yes)?"""
    return status.get("warm_contacts", 0) >= status.get("warm_target", 0)


def _tcp_summary(ms: list[float], tcp: list[dict[str, int]]) -> dict:
    """What TCP did during each operation (summed over the swarm): medians and totals of new
    connections and of retransmission timeouts, and the median time of operations with and without
    a new connection, with and without a timeout (a lost packet of a small message costs an RTO of
    >= 200 ms, not a fast retransmit)."""
    with_rto = [t for t, c in zip(ms, tcp, strict=True) if c.get("TCPTimeouts", 0)]
    without = [t for t, c in zip(ms, tcp, strict=True) if not c.get("TCPTimeouts", 0)]
    dialled = [t for t, c in zip(ms, tcp, strict=True) if c.get("ActiveOpens", 0)]
    warm = [t for t, c in zip(ms, tcp, strict=True) if not c.get("ActiveOpens", 0)]
    total = {key: sum(c.get(key, 0) for c in tcp) for key in tcp[0]} if tcp else {}
    return {
        "ops_with_new_connection": len(dialled),
        "median_ms_with_new_connection": round(statistics.median(dialled), 1) if dialled else None,
        "median_ms_without_new_connection": round(statistics.median(warm), 1) if warm else None,
        "new_connections_median": statistics.median(c.get("ActiveOpens", 0) for c in tcp),
        "tcp_totals": total,
        "ops_with_rto": len(with_rto),
        "median_ms_with_rto": round(statistics.median(with_rto), 1) if with_rto else None,
        "median_ms_without_rto": round(statistics.median(without), 1) if without else None,
        # each operation: [ms, new connections, retransmitted segments, RTOs, tail-loss probes]
        "per_op": [
            [
                round(t),
                c.get("ActiveOpens", 0),
                c.get("RetransSegs", 0),
                c.get("TCPTimeouts", 0),
                c.get("TCPLossProbes", 0),
            ]
            for t, c in zip(ms, tcp, strict=True)
        ],
    }


def replica_count(clients: list[Client], key: str) -> int:
    """How many nodes hold ``key`` in their own store (not looked up)."""
    return sum(bool(c.dht.get(key, local=True)) for c in clients)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="lan,metro,continental,intercontinental,mixed")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dht-nodes", default="32", help="swarm sizes, e.g. 32,64")
    parser.add_argument("--dht-ops", type=int, default=30)
    parser.add_argument("--no-dht", action="store_true")
    parser.add_argument("--label", default="lattice", help="the system name in the DHT figures")
    parser.add_argument("--compare-store", action="store_true",
                        help="also the DHT waiting for all k replicas, without warm connections")  # fmt: skip
    parser.add_argument("--no-rpc", action="store_true")
    parser.add_argument("--gib", action="store_true", help="also 1 GiB (172 s a transfer at 50 Mbit/s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-window", action="store_true",
                        help="also our RPC with a fixed 4 MiB stream window (no auto-tuning)")  # fmt: skip
    parser.add_argument("--tcp-mem-max", type=int, default=0, help="raise tcp_rmem/tcp_wmem max to this")
    parser.add_argument("--anchors", default="", help="also these anchors, e.g. lattica,hivemind")
    args = parser.parse_args()
    for system in filter(None, args.anchors.split(",")):
        if reason := in_testbed.unavailable(system):
            print(json.dumps({"bench": "wan", "system": system, "error": reason}), flush=True)
        else:
            ANCHORS.append(system)
    if args.tcp_mem_max:
        SYSCTLS["net.ipv4.tcp_rmem"] = f"4096 131072 {args.tcp_mem_max}"
        SYSCTLS["net.ipv4.tcp_wmem"] = f"4096 16384 {args.tcp_mem_max}"
    if reason := wan_unavailable():
        raise SystemExit(f"bench/wan needs a WAN testbed: {reason}")
    print(json.dumps({"bench": "wan", "loadavg": os.getloadavg(), "cpus": os.cpu_count()}), flush=True)
    for preset in map(parse_preset, args.presets.split(",")):
        if not args.no_rpc:
            bench_rpc(preset, args.runs, args.gib, args.compare_window)
        if not args.no_dht:
            for nodes in map(int, str(args.dht_nodes).split(",")):
                if args.compare_store:
                    _dht_wait_all_cold(preset, nodes, args.dht_ops, args.seed, args.label)
                bench_dht(preset, nodes, args.dht_ops, args.seed, args.label)
    print(json.dumps({"bench": "wan", "loadavg_end": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
