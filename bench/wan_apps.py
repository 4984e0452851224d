"""Apps on emulated wide-area links (issue 19): gossip SGD rounds and mesh inference tokens/s, each
against its wire-time floor, every peer in its own namespace (lattice.testing.wan, docs/wan.md).

    python bench/wan_apps.py gossip --presets lan,metro,continental,intercontinental --codecs none,fp16
    python bench/wan_apps.py mesh --presets continental --tokens 32
    python bench/wan_apps.py train --preset continental --codecs none,fp16 --budget-s 1800

Figures (one JSON line each):
  gossip_round  median round of a NUMEL-float32 message (default 4M: 16 MB) over a ring of PEERS
                peers (2 neighbours each; 1 with 2 peers), with a codec or none; floor = the bytes a
                peer must send / its uplink + one RTT; ratio = round / floor (target <= 1.2); CPU
                per round per peer, socket reads/writes and wake-ups per MiB; --pin: peer i on core i.
  mesh_tps      decode tokens/s through 3 stage daemons on 3 hosts (client on a 4th); floor =
                1 / (compute per token measured in one process + one RTT per hop per token,
                client -> s0 -> s1 -> s2 -> client); ratio = tokens/s / floor (target >= 0.8).
  train         accuracy against wall-clock time: 4 real gossip-sgd peers (dfedavg) training a wide
                MLP, one per namespace, for the same time budget per codec; every codec's run has
                its own testbed of the preset, all runs side by side (same machine load) or one
                after the other; accuracy of peer 0's own model and the mean over peers every
                --every-s, and at the end the run's average-model accuracy, rounds, bytes sent.
Needs root (network namespaces); run it alone on the machine when you can.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lattice.apps.gossip_sgd.launch import read_log
from lattice.testing.wan import PRESETS, Preset, WanTestbed

HERE = Path(__file__).resolve().parent
EXCHANGE_PEER = [sys.executable, str(HERE / "gossip_sgd_net.py"), "exchange-peer"]


def out(line: dict) -> None:
    print(json.dumps(line), flush=True)


def wire_bytes(numel: int, codec: str | None) -> int:
    """Bytes one message of NUMEL float32 values takes on the wire (payload only)."""
    if not codec:
        return 4 * numel
    name, _, param = codec.partition(":")
    if name in ("fp16", "bf16"):
        return 2 * numel
    if name.startswith("int8"):
        return numel
    if name == "topk":
        return int(numel * float(param or 0.1)) * 8  # value + index
    raise ValueError(f"unknown codec {codec!r}")


def gossip_floor_s(message_bytes: int, neighbours: int, up_mbit: float, rtt_ms: float) -> float:
    """The least a round can take: what a peer must send over its uplink, plus one round trip."""
    return neighbours * message_bytes * 8 / (up_mbit * 1e6) + rtt_ms / 1000


def ring_neighbours(peers: int) -> int:
    """How many neighbours a peer has on a ring of PEERS (2 peers: each is the other's only one)."""
    return min(2, peers - 1)


def pinned(argv: list[str], core: int | None) -> list[str]:
    """ARGV run on one core (``taskset``), or as it is when CORE is None."""
    return argv if core is None else ["taskset", "-c", str(core % (os.cpu_count() or 1)), *argv]


def cpu_ticks_s(pid: int | None) -> float:
    """User + system CPU seconds of process PID so far (0 when there is none)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tcp_segments(tb: WanTestbed, hosts: list[str]) -> tuple[int, int]:
    """TCP segments sent and received so far, summed over the hosts' namespaces (/proc/net/snmp)."""
    out = ins = 0
    for h in hosts:
        snmp = tb.run(h, ["cat", "/proc/net/snmp"]).stdout.splitlines()
        lines = [x.split() for x in snmp if x.startswith("Tcp:")]
        row = dict(zip(lines[0], lines[1], strict=True))
        out, ins = out + int(row["OutSegs"]), ins + int(row["InSegs"])
    return out, ins


def io_per_mib(records: list[dict], skip: int) -> dict[str, float]:
    """A peer's socket reads and read waits per MiB received, writes and write waits per MiB sent,
    over its steady rounds (``io`` of bench/gossip_sgd_net.py's exchange_rounds)."""
    io = records[0].get("io")
    if not io:
        return {}
    total = {k: sum(v[skip:]) for k, v in io.items() if k not in ("sndbuf", "rcvbuf")}
    mib_in, mib_out = max(total["bytes_in"], 1) / 2**20, max(total["bytes_out"], 1) / 2**20
    return {
        "reads": total["reads"] / mib_in,
        "read_waits": total["read_waits"] / mib_in,
        "writes": total["writes"] / mib_out,
        "write_waits": total["write_waits"] / mib_out,
        "sndbuf_kib": max(io.get("sndbuf", [0])) / 1024,  # the largest socket buffers seen at a round's end
        "rcvbuf_kib": max(io.get("rcvbuf", [0])) / 1024,
    }


def parse_preset(text: str) -> str | Preset:
    """A preset name, or NAME=RTT_MS/MBIT[/LOSS] (as bench/wan.py), e.g. ``noloss=40/200``."""
    name, sep, spec = text.partition("=")
    if not sep:
        if name != "mixed" and name not in PRESETS:
            raise SystemExit(f"unknown preset {name!r}")
        return name
    parts = [float(x) for x in spec.split("/")]
    return Preset(name, rtt_ms=parts[0], rate_mbit=parts[1], loss=parts[2] if len(parts) > 2 else 0.0)


def gossip_round(
    preset: str | Preset,
    peers: int = 4,
    numel: int = 4 << 20,
    codec: str | None = None,
    rounds: int = 8,
    sets: tuple[str, ...] = (),
    timeout: float = 120.0,
    sysctls: dict[str, str] | None = None,
    tcp_baseline: bool = True,
    profile: Path | None = None,
    pin: bool = False,
) -> dict[str, Any]:
    """Run PEERS gossip peers (bench/gossip_sgd_net.py exchange-peer), one per namespace of a
    :class:`WanTestbed` under PRESET, for ROUNDS rounds; return the round time against its floor.
    PROFILE: a file where py-spy writes peer 1's samples (collapsed stacks, all threads, idle left out).
    PIN: peer i (and host i of the plain-TCP ring) runs on core i mod the machine's cores."""
    hosts = [f"g{i}" for i in range(peers)]
    work = Path(tempfile.mkdtemp(prefix="wan-gossip-"))
    codec_sets = [f"--set=codec={codec}"] if codec else []
    args = ["--rounds", str(rounds), "--numel", str(numel), "--timeout", "60", "--wait", "60",
            "--linger", "10", *codec_sets, *[f"--set={s}" for s in sets]]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = []
    try:
        with WanTestbed(hosts, preset, sysctls=sysctls) as tb:

            def spawn(i: int, more: list[str]) -> Any:
                d = work / f"peer{i}"
                d.mkdir(parents=True)
                argv = [*EXCHANGE_PEER, "--run", "wan", "--peers", str(peers), "--out", str(d),
                        "--listen", f"/ip4/{tb.ip(hosts[i])}/tcp/0", *args, *more]  # fmt: skip
                if profile is not None and i == 1:
                    argv = ["py-spy", "record", "--format", "raw", "--rate", "250", "--nonblocking",
                            "--threads", "-o", str(profile), "--", *argv]  # fmt: skip
                argv = pinned(argv, i if pin else None)
                with open(d / "stdout", "w") as so, open(d / "stderr", "w") as se:
                    return tb.popen(hosts[i], argv, env=env, stdout=so, stderr=se)

            addr_file = work / "bootstrap.addr"
            delayline_cpu = cpu_ticks_s(tb.delayline_pid())
            segments = tcp_segments(tb, hosts)
            procs.append(spawn(0, ["--addr-file", str(addr_file)]))
            deadline = time.monotonic() + 180  # a loaded machine (load 30) took over 60 s
            while not addr_file.exists():
                if time.monotonic() > deadline or procs[0].poll() is not None:
                    raise RuntimeError(
                        f"gossip peer 0 did not start: {(work / 'peer0/stderr').read_text()[-800:]}"
                    )
                time.sleep(0.05)
            addr = addr_file.read_text().strip()
            procs += [spawn(i, ["--bootstrap", addr]) for i in range(1, peers)]
            end = time.monotonic() + timeout + rounds * 60
            for p in procs:
                p.wait(timeout=max(1.0, end - time.monotonic()))
            delayline_cpu = cpu_ticks_s(tb.delayline_pid()) - delayline_cpu
            segments = tuple(b - a for a, b in zip(segments, tcp_segments(tb, hosts), strict=True))
            tcp = tcp_ring_round(tb, hosts, wire_bytes(numel, codec), rounds, pin) if tcp_baseline else None
            links = dict(tb.links)
            rtt = max(tb.rtt_ms(a, b) for a in hosts for b in hosts if a != b)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    per_peer = []
    timeouts, cpu, faults, io = 0, [], [], []
    for i in range(peers):
        done = [r for r in read_log(work / f"peer{i}" / "log.jsonl") if r.get("event") == "done"]
        if done:
            # round 0 includes the start skew; rounds 1-2 were slower in every run (warm-up: buffers,
            # windows, page faults): a steady-state figure leaves them out when there are enough
            skip = 3 if rounds >= 6 else 1
            per_peer.append(done[0]["exchange_s"][skip:])
            timeouts += done[0].get("timeouts", 0)
            # the mean, not the median: a message received during the next round is that round's CPU
            cpu.append(statistics.fmean(done[0].get("cpu_s", [0, 0])[skip:]))
            faults.append(statistics.median(done[0].get("minor_faults", [0, 0])[skip:]))
            io.append(io_per_mib(done, skip))
    errors = "" if len(per_peer) == peers else (work / "peer0" / "stderr").read_text()[-800:]
    if not errors:
        shutil.rmtree(work, ignore_errors=True)
    message = wire_bytes(numel, codec)
    slowest_up = min(link.up_mbit for link in links.values())
    neighbours = ring_neighbours(peers)
    floor = gossip_floor_s(message, neighbours, slowest_up, rtt)
    rounds_all = [x for xs in per_peer for x in xs]
    median = statistics.median(rounds_all) if rounds_all else None
    return {
        "figure": "wan_apps.gossip_round",
        "preset": preset
        if isinstance(preset, str)
        else f"{preset.name}={preset.rtt_ms:g}/{preset.rate_mbit:g}/{preset.loss:g}",
        "peers": peers,
        "neighbours": neighbours,
        "pinned": pin,
        "message_mb": round(message / 1e6, 2),
        "codec": codec,
        "rounds_measured": len(rounds_all),
        "median_round_s": round(median, 3) if median else None,
        "slowest_peer_median_s": round(max(statistics.median(x) for x in per_peer if x), 3)
        if median
        else None,
        "floor_s": round(floor, 3),
        "ratio": round(median / floor, 2) if median else None,
        "target_ratio": 1.2,
        # the same ring exchange in plain TCP (no encryption, no framing), same testbed, same bytes
        "tcp_median_round_s": round(tcp, 3) if tcp else None,
        "tcp_ratio": round(tcp / floor, 2) if tcp else None,
        "timeouts": timeouts,
        "sysctls": sysctls or {},
        "rounds_s": [[round(x, 2) for x in xs] for xs in per_peer],
        # CPU seconds of one round, summed over the peers (all share this machine's cores)
        "cpu_s_per_round_all_peers": round(sum(cpu), 3),
        # the same per peer (median over peers of their steady-state means): what does not depend on load
        "cpu_s_per_round_per_peer": round(statistics.median(cpu), 4) if cpu else None,
        "minor_faults_per_round_per_peer": statistics.median(faults) if faults else None,
        # socket reads/writes and waits (wake-ups) per MiB, median over peers, steady rounds
        "io_per_mib_per_peer": {k: round(statistics.median(x[k] for x in io), 1) for k in io[0]}
        if io and io[0]
        else None,
        # the emulated path's delay line (user space, one process for all hosts) shares the cores
        "delayline_cpu_s_per_round": round(delayline_cpu / rounds, 3),
        # TCP segments through the emulated path per round, all hosts (data one way, ACKs the other)
        "tcp_segments_out_per_round": round(segments[0] / rounds),
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        **({"error": errors} if errors else {}),
    }


# One host of the plain-TCP ring baseline: argv = my index, comma-separated IPs, port, bytes, rounds.
# Per round it sends BYTES to both ring neighbours and reads BYTES from both, over connections kept
# open between rounds (warm, idle while waiting, like the peers'); prints the round times (JSON).
_TCP_RING = r"""
import json, socket, sys, threading, time
me, ips = int(sys.argv[1]), sys.argv[2].split(",")
port, size, rounds = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
n = len(ips); nb = sorted({(me - 1) % n, (me + 1) % n})
srv = socket.create_server((ips[me], port)); srv.listen(8)
outs = []
for j in nb:
    while True:
        try:
            outs.append(socket.create_connection((ips[j], port))); break
        except OSError:
            time.sleep(0.05)
ins = [srv.accept()[0] for _ in nb]
data = bytes(size)
def send(c): c.sendall(data)
def recv(c):
    buf = bytearray(1 << 20); left = size
    while left:
        k = c.recv_into(buf, min(left, len(buf)))
        if not k: raise EOFError
        left -= k
times = []
for _ in range(rounds):
    t0 = time.perf_counter()
    ts = [threading.Thread(target=f, args=(c,)) for f, cs in ((send, outs), (recv, ins)) for c in cs]
    for t in ts: t.start()
    for t in ts: t.join()
    times.append(time.perf_counter() - t0)
print(json.dumps(times))
"""


def tcp_ring_round(tb: WanTestbed, hosts: list[str], size: int, rounds: int, pin: bool = False) -> float:
    """The median round of the plain-TCP ring baseline (:data:`_TCP_RING`) on the same testbed
    (PIN: host i on core i, as the peers)."""
    ips = ",".join(tb.ip(h) for h in hosts)
    argv = [sys.executable, "-c", _TCP_RING]
    procs = [tb.popen(h, pinned([*argv, str(i), ips, "5599", str(size), str(rounds)], i if pin else None),
                      stdout=subprocess.PIPE, text=True) for i, h in enumerate(hosts)]  # fmt: skip
    times = []
    for p in procs:
        stdout, _ = p.communicate(timeout=60 + rounds * 60)
        times += json.loads(stdout)[1:]
    return statistics.median(times)


def content_fetch(size: int = 256 << 20, runs: int = 1) -> dict[str, Any]:
    """Four providers on the ``mixed`` links (cloud, lab, home fibre, home cable: 1000/500/100/20
    Mbit/s up) hold the same SIZE-byte file; a fetcher on a cloud link gets it from all four
    (``content.get`` through its control socket), alternated with a get from the fastest of them
    alone (the cloud provider: what 4 providers must at least match). Floor = size / min(fetcher's
    downlink, the sum of the providers' uplinks) + one RTT to the furthest provider."""
    from lattice import Client
    from lattice.testing.daemons import start_daemon
    from lattice.testing.wan import mixed_links

    hosts = ["p0", "p1", "p2", "p3", "fetcher"]
    links = mixed_links(hosts)
    work = Path(tempfile.mkdtemp(prefix="wan-content-"))
    blob = work / "model.bin"
    with open(blob, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    daemons = []
    seconds: list[float] = []
    alone: list[float] = []
    try:
        with WanTestbed(hosts, "mixed") as tb:
            for h in hosts:
                args = ["--listen", f"/ip4/{tb.ip(h)}/tcp/4001"]
                daemons.append(start_daemon(work, h, args, testbed=tb, timeout=60))
            cids = set()
            for d in daemons[:4]:
                with Client(d.info["control"], timeout=600) as c:
                    cids.add(c.content.add(str(blob))["cid"])
            assert len(cids) == 1, cids
            cid = cids.pop()
            providers = [d.info["addrs"][0] for d in daemons[:4]]
            fetcher = daemons[4].info["control"]
            last: dict = {}
            for _ in range(runs):
                # alone: no DHT lookup, or it finds the other three
                for named, times, all_four in ((providers, seconds, True), (providers[:1], alone, False)):
                    t0 = time.perf_counter()
                    with Client(fetcher, timeout=900) as c:
                        for item in c.content.get(cid, providers=named, pin=False, discover=all_four):
                            if all_four:
                                last = item
                    times.append(time.perf_counter() - t0)
                    with Client(fetcher) as c:
                        c.content.gc()
            rtt = max(tb.rtt_ms("fetcher", h) for h in hosts[:4])
    finally:
        for d in daemons:
            d.stop()
        shutil.rmtree(work, ignore_errors=True)
    up = sum(links[h].up_mbit for h in hosts[:4])
    rate = min(links["fetcher"].down_mbit, up)
    floor = size * 8 / (rate * 1e6) + rtt / 1000
    median = statistics.median(seconds)
    return {
        "figure": "wan_apps.content_fetch",
        "preset": "mixed",
        "size_mib": size >> 20,
        "providers": {h: links[h].label for h in hosts[:4]},
        "fetcher": links["fetcher"].label,
        "median_s": round(median, 2),
        "runs_s": [round(x, 2) for x in seconds],
        "mib_per_s": round(size / (1 << 20) / median, 1),
        "floor_s": round(floor, 2),
        "ratio": round(median / floor, 2),
        "one_provider_alone": links[hosts[0]].label,
        "one_provider_runs_s": [round(x, 2) for x in alone],
        "one_provider_mib_per_s": round(size / (1 << 20) / statistics.median(alone), 1),
        "last_item": {
            k: v
            for k, v in last.items()
            if k in ("bytes", "chunks", "providers", "bad_providers", "duplicates", "per_provider")
        },
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


MESH_HOSTS = ["client", "s0", "s1", "s2"]


def mesh_tps(
    rtt_ms: float = 20.0,
    rate_mbit: float = 500.0,
    model: str = "tiny-random",
    tokens: int = 32,
    runs: int = 3,
    threads: int = 1,
) -> dict[str, Any]:
    """Three stage daemons (``serve-model``) and a client, each on its own host, every pair
    RTT_MS apart: decode tokens/s against the floor 1 / (compute per token + 3 RTT)."""
    from lattice.apps.mesh_inference.weights import open_model
    from lattice.testing.daemons import start_daemon
    from lattice.testing.wan import Link

    n_layers = open_model(model).config.n_layers
    cuts = [round(n_layers * i / 3) for i in range(4)]
    link = Link(delay_ms=rtt_ms / 4, up_mbit=rate_mbit, down_mbit=rate_mbit, label=f"mesh-{rtt_ms:g}ms")
    work = Path(tempfile.mkdtemp(prefix="wan-mesh-"))
    daemons = []
    try:
        with WanTestbed(MESH_HOSTS, links=dict.fromkeys(MESH_HOSTS, link)) as tb:
            boot: list[str] = []
            for i in range(3):
                args = ["--model", model, "--blocks", f"{cuts[i]}:{cuts[i + 1]}", "--listen",
                        f"/ip4/{tb.ip(f's{i}')}/tcp/4001", "--threads", str(threads),
                        "--announce-interval", "2", *[x for a in boot for x in ("--bootstrap", a)],
                ]  # fmt: skip
                daemons.append(
                    start_daemon(work, f"s{i}", args, testbed=tb, command="serve-model", timeout=120)
                )
                boot = boot or daemons[0].info["addrs"][:1]
            argv = [sys.executable, __file__, "mesh-client", "--model", model, "--tokens", str(tokens),
                    "--runs", str(runs), "--threads", str(threads),
                    "--listen", f"/ip4/{tb.ip('client')}/tcp/0",
                    "--bootstrap", boot[0], "--data-dir", str(work / "client")]  # fmt: skip
            proc = tb.popen("client", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            stdout, stderr = proc.communicate(timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"mesh client failed: {stderr[-1500:]}")
            measured = json.loads(stdout.strip().splitlines()[-1])
    finally:
        for d in daemons:
            d.stop()
    shutil.rmtree(work, ignore_errors=True)
    compute = measured["compute_s_per_token"]
    floor_tps = 1 / (compute + 3 * rtt_ms / 1000)
    return {
        "figure": "wan_apps.mesh_tps",
        "model": model,
        "stages": 3,
        "rtt_ms": rtt_ms,
        "rate_mbit": rate_mbit,
        **measured,
        "floor_tps": round(floor_tps, 2),
        "ratio": round(measured["mesh_tps"] / floor_tps, 3),
        "target_ratio": 0.8,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def mesh_client(args: argparse.Namespace) -> None:
    """The client of :func:`mesh_tps` (run inside the client's namespace): compute per token of
    the whole model in this process, then decode tokens/s through the mesh; one JSON line."""
    import torch
    import trio

    from lattice import Node, NodeConfig
    from lattice.apps.mesh_inference.client import MeshClient
    from lattice.apps.mesh_inference.model import KVCache, Stage
    from lattice.apps.mesh_inference.weights import open_model

    torch.set_num_threads(args.threads)
    source = open_model(args.model)
    n = source.config.n_layers
    local = Stage(source.config, source.load(0, n), 0, n)
    prompt = list(range(1, 9))

    def local_step_s() -> float:
        cache = KVCache()
        logits = local.forward(torch.tensor([prompt]), cache)[0, -1]
        tok, t0 = int(logits.argmax()), time.perf_counter()
        for _ in range(args.tokens - 1):
            tok = int(local.forward(torch.tensor([[tok]]), cache)[0, -1].argmax())
        return (time.perf_counter() - t0) / (args.tokens - 1)

    async def main() -> dict[str, Any]:
        cfg = NodeConfig(listen=[args.listen], data_dir=Path(args.data_dir), control=False,
                         bootstrap=[args.bootstrap])  # fmt: skip
        async with Node(cfg) as node:
            client = MeshClient(node, source.model_id)
            with trio.fail_after(60):
                while len(await client.servers(fresh=True)) < 3:
                    await trio.sleep(0.2)
            compute, tps, steps = [], [], []
            for _ in range(args.runs):  # alternate local and mesh runs: both see the same machine
                compute.append(local_step_s())
                async with client.session() as session:
                    tok = int((await session.forward(prompt)).argmax())
                    t0 = time.perf_counter()
                    for _ in range(args.tokens - 1):
                        t = time.perf_counter()
                        tok = int((await session.forward([tok])).argmax())
                        steps.append(time.perf_counter() - t)
                    tps.append((args.tokens - 1) / (time.perf_counter() - t0))
            return {
                "compute_s_per_token": round(statistics.median(compute), 5),
                "mesh_tps": round(statistics.median(tps), 2),
                "mesh_runs_tps": [round(x, 2) for x in tps],
                "median_step_ms": round(statistics.median(steps) * 1000, 2),
                "p90_step_ms": round(sorted(steps)[int(len(steps) * 0.9)] * 1000, 2),
                "tokens": args.tokens,
            }

    print(json.dumps(trio.run(main)), flush=True)


TRAIN_PEERS = 4


def train_runs(
    preset: str | Preset,
    codecs: list[str | None],
    budget_s: float,
    peer_args: list[str],
    side_by_side: bool = True,
    nice: int = 0,
    every_s: float = 60.0,
) -> list[dict[str, Any]]:
    """Train with each codec for ``budget_s`` s (``gossip-sgd peer --time-budget``), 4 peers on a
    ring, each run on a testbed of its own; returns one summary per codec (see :func:`train_summary`)."""
    from lattice.apps.gossip_sgd.data import fetch_fashion_mnist, find_fashion_mnist

    data_dir = find_fashion_mnist() or fetch_fashion_mnist()
    work = Path(tempfile.mkdtemp(prefix="wan-train-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    groups = [codecs] if side_by_side else [[c] for c in codecs]
    results = []
    for group in groups:
        with contextlib.ExitStack() as stack:
            runs = []
            for codec in group:
                name = codec or "none"
                hosts = [f"t{i}" for i in range(TRAIN_PEERS)]
                tb = stack.enter_context(WanTestbed(hosts, preset))
                run_dir = work / name.replace(":", "_")
                args = ["nice", "-n", str(nice), sys.executable, "-m", "lattice.apps.gossip_sgd", "peer",
                        "--run", f"train-{name}", "--peers", str(TRAIN_PEERS), "--time-budget", str(budget_s),
                        "--data", data_dir, "--threads", "1", "--no-progress", *peer_args,
                        *([f"--set=codec={codec}"] if codec else [])]  # fmt: skip
                runs.append((codec, run_dir, start_ring(tb, hosts, args, run_dir, env)))
            started = time.monotonic()
            load = [os.getloadavg()[0]]
            for _, _, procs in runs:
                for p in procs:
                    while p.poll() is None:
                        time.sleep(5)
                        if len(load) < (time.monotonic() - started) / 60:
                            load.append(os.getloadavg()[0])
                        if time.monotonic() - started > budget_s + 600:
                            raise RuntimeError(
                                f"training peers still running {budget_s + 600:.0f} s in: {work}"
                            )
            for codec, run_dir, procs in runs:
                rec = train_summary(run_dir, budget_s, every_s)
                errors = [(run_dir / f"peer{i}" / "stderr").read_text()[-800:]
                          for i, p in enumerate(procs) if p.returncode != 0]  # fmt: skip
                results.append({
                    "figure": "wan_apps.train", "preset": preset if isinstance(preset, str) else preset.name,
                    "codec": codec, "budget_s": budget_s, "side_by_side": group if len(group) > 1 else None,
                    **rec, "peer_args": peer_args, "nice": nice, "cores": os.cpu_count(),
                    "load_avg_1m_per_min": [round(x, 1) for x in load], "logs": str(run_dir),
                    **({"errors": errors} if errors else {}),
                })  # fmt: skip
    return results


def start_ring(tb: WanTestbed, hosts: list[str], args: list[str], run_dir: Path, env: dict) -> list[Any]:
    """Start one gossip-sgd peer per host (peer 0 first: the others bootstrap to it)."""

    def spawn(i: int, more: list[str]) -> Any:
        d = run_dir / f"peer{i}"
        d.mkdir(parents=True)
        argv = [*args, "--out", str(d), "--listen", f"/ip4/{tb.ip(hosts[i])}/tcp/0", *more]
        with open(d / "stdout", "w") as so, open(d / "stderr", "w") as se:
            return tb.popen(hosts[i], argv, env=env, stdout=so, stderr=se)

    addr_file = run_dir / "bootstrap.addr"
    procs = [spawn(0, ["--addr-file", str(addr_file)])]
    deadline = time.monotonic() + 120
    while not addr_file.exists():
        if time.monotonic() > deadline or procs[0].poll() is not None:
            raise RuntimeError(f"peer 0 did not start: {(run_dir / 'peer0/stderr').read_text()[-800:]}")
        time.sleep(0.1)
    addr = addr_file.read_text().strip()
    return procs + [spawn(i, ["--bootstrap", addr]) for i in range(1, len(hosts))]


def acc_at(rounds: list[dict], t: float) -> float | None:
    """The accuracy of the last evaluation done by ``t`` s on the run's clock (None: none yet)."""
    done = [r["acc_local"] for r in rounds if r["t_s"] <= t]
    return round(done[-1], 4) if done else None


def train_summary(run_dir: Path, budget_s: float, every_s: float) -> dict[str, Any]:
    """Accuracy every ``every_s`` s (peer 0's own model, the mean over peers), the average model's
    accuracy at the end, rounds, bytes sent per peer and the mean round time, from the peers' logs."""
    logs = [read_log(run_dir / f"peer{i}" / "log.jsonl") for i in range(TRAIN_PEERS)]
    rounds = [[r for r in log if r.get("event") == "round"] for log in logs]
    done = [next((r for r in log if r.get("event") == "done"), {}) for log in logs]
    average = next((r for log in logs for r in log if r.get("event") == "average"), {})
    times = [every_s * k for k in range(1, int(budget_s // every_s) + 1)]
    at = []
    for t in times:
        accs = [acc_at(rs, t) for rs in rounds]
        known = [a for a in accs if a is not None]
        at.append(
            {"t_s": t, "acc_peer0": accs[0], "acc_mean": round(sum(known) / len(known), 4) if known else None}
        )
    last = [rs[-1] for rs in rounds if rs]
    return {
        "acc_at": at,
        "acc_avg_end": average.get("acc_avg"),
        "acc_local_end_mean": round(sum(r["acc_local"] for r in last) / len(last), 4) if last else None,
        "end_t_s": max((r["t_s"] for r in last), default=None),
        "rounds": max((r["round"] for r in last), default=0),
        "round_s_mean": round(last[0]["t_s"] / last[0]["round"], 3) if last else None,
        "mb_sent_per_peer": round(sum(d.get("bytes_sent", 0) for d in done) / max(1, len(done)) / 1e6, 1),
        "timeouts": sum(d.get("timeouts", 0) for d in done),
        "exchange_median_s": [d.get("exchange_median_s") for d in done],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gossip", help="gossip SGD round time against its wire-time floor")
    g.add_argument("--presets", default="lan,metro,continental,intercontinental")
    g.add_argument("--codecs", default="none,fp16", help="comma-separated; none = float32")
    g.add_argument("--peers", type=int, default=4)
    g.add_argument("--numel", type=int, default=4 << 20)
    g.add_argument("--rounds", type=int, default=8, help="per run; the first 3 are warm-up (from 6 on)")
    g.add_argument("--runs", type=int, default=1, help="repetitions (codecs alternate within one)")
    g.add_argument("--set", action="append", default=[], help="hyper-parameter override for the peers")
    g.add_argument("--profile", type=Path, help="py-spy peer 1 into this file (collapsed stacks)")
    g.add_argument("--pin", action="store_true", help="peer i on core i mod cores (taskset)")
    m = sub.add_parser("mesh", help="mesh inference tokens/s against its floor")
    m.add_argument("--rtt-ms", type=float, default=20.0, help="between any two hosts (default 20)")
    m.add_argument("--rate-mbit", type=float, default=500.0)
    m.add_argument("--model", default="tiny-random")
    m.add_argument("--tokens", type=int, default=32)
    m.add_argument("--runs", type=int, default=3)
    m.add_argument("--threads", type=int, default=1)
    t = sub.add_parser("train", help="accuracy against wall-clock time per codec (real training)")
    t.add_argument("--preset", default="continental")
    t.add_argument("--codecs", default="none,fp16", help="comma-separated; none = float32")
    t.add_argument("--budget-s", type=float, default=1800.0, help="wall-clock budget per codec (s)")
    t.add_argument("--every-s", type=float, default=60.0, help="report accuracy every so many s")
    t.add_argument(
        "--sequential", action="store_true", help="one codec after the other (default: side by side)"
    )
    t.add_argument("--nice", type=int, default=0, help="niceness of the training processes")
    t.add_argument("--width", type=int, default=1024, help="the MLP's hidden width (784-W-W-10)")
    t.add_argument("--eval-every", type=int, default=5, help="rounds between evaluations (2000 test samples)")
    t.add_argument(
        "--set", action="append", default=[], help="hyper-parameter override (default local_steps=5)"
    )
    k = sub.add_parser("content", help="a model from 4 providers on mixed links against its floor")
    k.add_argument("--size-mib", type=int, default=256)
    k.add_argument("--runs", type=int, default=1)
    for p in sub.choices.values():
        p.add_argument("--sysctl", action="append", default=[], metavar="KEY=VALUE",
                       help="sysctl in every host (net.ipv4.tcp_slow_start_after_idle=0)")  # fmt: skip
    if argv is None and sys.argv[1:2] == ["mesh-client"]:  # internal: the client inside its namespace
        c = argparse.ArgumentParser(prog="wan_apps.py mesh-client")
        for opt in ("--model", "--listen", "--bootstrap", "--data-dir"):
            c.add_argument(opt, required=True)
        for opt in ("--tokens", "--runs", "--threads"):
            c.add_argument(opt, type=int, required=True)
        mesh_client(c.parse_args(sys.argv[2:]))
        return 0
    args = ap.parse_args(argv)
    sysctls = dict(x.split("=", 1) for x in args.sysctl)
    if args.what == "gossip":
        for preset in map(parse_preset, args.presets.split(",")):
            for _ in range(args.runs):
                for codec in args.codecs.split(","):
                    c = None if codec == "none" else codec
                    out(
                        gossip_round(
                            preset,
                            args.peers,
                            args.numel,
                            c,
                            args.rounds,
                            tuple(args.set),
                            sysctls=sysctls,
                            profile=args.profile and args.profile.with_suffix(f".{preset}.{codec}.txt"),
                            pin=args.pin,
                        )
                    )
    elif args.what == "train":
        sets = args.set or ["local_steps=5"]
        peer_args = ["--algorithm", "dfedavg", "--model", f"mlp:{args.width}", "--rounds", "1000000",
                     "--eval-every", str(args.eval_every), "--timeout", "120", "--wait", "300",
                     "--linger", "120",
                     "--checkpoint-every", "0", *[f"--set={s}" for s in sets]]  # fmt: skip
        codecs = [None if c == "none" else c for c in args.codecs.split(",")]
        for rec in train_runs(parse_preset(args.preset), codecs, args.budget_s, peer_args,
                              not args.sequential, args.nice, args.every_s):  # fmt: skip
            out(rec)
    elif args.what == "content":
        out(content_fetch(args.size_mib << 20, args.runs))
    elif args.what == "mesh":
        out(mesh_tps(args.rtt_ms, args.rate_mbit, args.model, args.tokens, args.runs, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
