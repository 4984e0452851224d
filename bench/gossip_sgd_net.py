"""Real network: peer processes (embedded nodes) on 127.0.0.1 against the simulator, same config.

Figures (one JSON line each):
  round_time   median gossip round for a 4M-float32 (16 MB) message, ring (2 neighbours), N peers
  accuracy     average-model and local accuracy after R rounds, network vs simulator (same run)
  kill         2 of N peers SIGKILLed mid-run: the rest finish; their accuracy

    python bench/gossip_sgd_net.py --peers 8 --rounds 100 --algorithm dfedavg
    python bench/gossip_sgd_net.py --only round_time

round_time starts its peers as `python bench/gossip_sgd_net.py exchange-peer PEER_OPTIONS --numel N`:
a gossip peer (lattice.apps.gossip_sgd.network.run_peer) whose body is :func:`exchange_rounds`
instead of training.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lattice.apps.gossip_sgd.experiment import Config, prepare, simulate
from lattice.apps.gossip_sgd.launch import read_log, start_peers
from lattice.apps.gossip_sgd.models import accuracy

EXCHANGE_PEER = [sys.executable, str(Path(__file__).resolve()), "exchange-peer"]


def _wait(procs, timeout):
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))


def round_time(args, root: Path) -> dict:
    out = root / "round_time"
    rounds = args.exchange_rounds
    procs = start_peers(
        args.peers,
        "bench-rt",
        out,
        [
            "--rounds",
            str(rounds),
            "--numel",
            str(args.numel),
            "--timeout",
            "30",
            "--wait",
            "60",
            "--linger",
            "10",
            *[f"--set={x}" for x in args.set],
        ],
        command=EXCHANGE_PEER,
    )
    try:
        _wait(procs, 600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    per_round, cpu, loop, faults = [], [], [], []
    for i in range(args.peers):
        done = [r for r in read_log(out / f"peer{i}" / "log.jsonl") if r.get("event") == "done"]
        if done:
            per_round.append(done[0]["exchange_s"][1:])  # round 0 includes the start skew
            cpu.append(done[0].get("cpu_s", [])[1:])
            loop.append(done[0].get("loop_s", [])[1:])
            faults.append(done[0].get("minor_faults", [])[1:])
    medians = [statistics.median(x) for x in per_round if x]
    cpu_medians = [statistics.median(x) for x in cpu if x]
    cpu_round = sum(cpu_medians) if cpu_medians else None
    return {
        "figure": "gossip_sgd_net.round_time",
        "peers": args.peers,
        "neighbours": 2,
        "message_mb": args.numel * 4 / 1e6,
        "codec": next((x.split("=", 1)[1] for x in args.set if x.startswith("codec=")), None),
        "rounds": rounds,
        "peers_reporting": len(medians),
        "median_round_s": statistics.median(medians) if medians else None,
        "slowest_peer_median_s": max(medians) if medians else None,
        # CPU seconds one round costs, summed over the peer processes (each one's median round)
        # the whole loop of a round (exchange, mix, progress write), median over peers
        "median_loop_s": statistics.median(statistics.median(x) for x in loop if x) if any(loop) else None,
        "minor_faults_per_round_all_peers": sum(int(statistics.median(x)) for x in faults if x),
        "cpu_s_per_round_all_peers": round(cpu_round, 3) if cpu_round else None,
        "cpu_floor_round_s": round(cpu_round / (os.cpu_count() or 1), 3) if cpu_round else None,
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "anchor_hivemind_allreduce_4peers_16mb_s": 0.46,
    }


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


_IO_COUNTERS = ("reads", "read_waits", "writes", "write_waits")


def _io_counters(host) -> dict[str, int]:
    """Socket reads/writes and waits for readable/writable, summed over the host's connections, and
    the bytes they moved (yamux, both ways)."""
    conns = host.connections()
    out = {k: sum(getattr(c.session.secure, k, 0) for c in conns) for k in _IO_COUNTERS}
    out["bytes_in"] = sum(c.session.bytes_received for c in conns)
    out["bytes_out"] = sum(c.session.bytes_sent for c in conns)
    out["sndbuf"] = max([_sock_opt(c, socket.SO_SNDBUF) for c in conns] or [0])
    out["rcvbuf"] = max([_sock_opt(c, socket.SO_RCVBUF) for c in conns] or [0])
    return out


def _per_round(key: str, before: int, after: int) -> int:
    """A counter's increase over a round; a buffer size as it is at the round's end."""
    return after if key in ("sndbuf", "rcvbuf") else after - before


def _sock_opt(conn, opt: int) -> int:
    sock = getattr(conn.session.secure.raw, "socket", None)
    return sock.getsockopt(socket.SOL_SOCKET, opt) if sock is not None else 0


async def exchange_rounds(run, numel: int) -> dict:
    """A peer's body for round_time: no data, one NUMEL-float32 message per round, mixed. Per round:
    CPU seconds of this process (all threads), wall seconds of the whole loop (exchange + mix +
    progress write), minor page faults, socket reads/writes/waits (see :func:`_io_counters`)."""
    from lattice.apps.gossip_sgd.algorithms import Send

    gossip, rounds = run.gossip, run.cfg.rounds
    host = gossip.node.host
    x = torch.randn(1, numel, generator=torch.Generator().manual_seed(run.rank))
    cpu, wall, faults = [time.process_time()], [time.perf_counter()], [_minor_faults()]
    io = [_io_counters(host)]
    for t in range(rounds):
        r = await gossip.exchange(t, Send("bench", {"x": x}, {"x": run.cfg.hp.codec}))
        x = r.mix("x")
        gossip.progress(t, final=t == rounds - 1)
        cpu.append(time.process_time())
        wall.append(time.perf_counter())
        faults.append(_minor_faults())
        io.append(_io_counters(host))
    return {
        "event": "done",
        "peer": gossip.me,
        "exchange_s": gossip.stats.exchange_s,
        "cpu_s": [round(b - a, 4) for a, b in itertools.pairwise(cpu)],
        "loop_s": [round(b - a, 4) for a, b in itertools.pairwise(wall)],
        "minor_faults": [b - a for a, b in itertools.pairwise(faults)],
        "io": {k: [_per_round(k, a[k], b[k]) for a, b in itertools.pairwise(io)] for k in io[0]},
        "timeouts": gossip.stats.timeouts,
        "bytes_sent": gossip.stats.bytes_sent,
    }


def exchange_peer(argv: list[str]) -> None:
    """One peer of round_time (started by start_peers): the peer options of `gossip-sgd peer`."""
    import trio

    from lattice.apps.gossip_sgd.cli import add_peer_options
    from lattice.apps.gossip_sgd.network import run_peer
    from lattice.apps.gossip_sgd.options import add_config_args

    ap = argparse.ArgumentParser(prog="gossip_sgd_net.py exchange-peer")
    add_config_args(ap)
    add_peer_options(ap)
    ap.add_argument("--numel", type=int, required=True, help="float32 values per message")
    args = ap.parse_args(argv)
    body = functools.partial(exchange_rounds, numel=args.numel)
    print(json.dumps(trio.run(functools.partial(run_peer, args, body))))


def _cfg(args) -> Config:
    from lattice.apps.gossip_sgd.options import hyper_from

    return Config(
        algorithm=args.algorithm,
        peers=args.peers,
        topology="ring",
        alpha=args.alpha,
        rounds=args.rounds,
        eval_every=args.eval_every,
        hp=hyper_from(args.set),
    )


def _peer_args(args) -> list[str]:
    extra = [f"--set={s}" for s in args.set]
    return [
        "--algorithm",
        args.algorithm,
        "--alpha",
        str(args.alpha),
        "--rounds",
        str(args.rounds),
        "--eval-every",
        str(args.eval_every),
        "--timeout",
        str(args.timeout),
        "--wait",
        "90",
        *extra,
    ]


def _final_accuracy(cfg: Config, out: Path, alive: list[int]) -> dict:
    prep = prepare(Config(**{**cfg.__dict__, "peers": cfg.peers}), [0])
    from safetensors.torch import load_file

    models = torch.stack([load_file(out / f"peer{i}" / "model.safetensors")["x"] for i in alive])
    avg = float(accuracy(prep.model, models.mean(0, keepdim=True), prep.test_x, prep.test_y)[0])
    local = float(accuracy(prep.model, models, prep.test_x, prep.test_y).mean())
    cons = float(((models - models.mean(0)) ** 2).sum(1).mean())
    return {"acc_avg": avg, "acc_local": local, "consensus": cons}


def train(args, root: Path, name: str, kill: int) -> dict:
    out = root / name
    cfg = _cfg(args)
    procs = start_peers(args.peers, f"bench-{name}", out, _peer_args(args))
    victims = list(range(args.peers - kill, args.peers))
    killed_at = None
    started = time.monotonic()
    try:
        if victims:
            deadline = time.monotonic() + 3600
            while killed_at is None and time.monotonic() < deadline:
                rounds = [
                    r["round"] for r in read_log(out / "peer0" / "log.jsonl") if r.get("event") == "round"
                ]
                if rounds and rounds[-1] >= args.kill_at:
                    for v in victims:
                        procs[v].send_signal(signal.SIGKILL)
                    killed_at = rounds[-1]
                time.sleep(0.2)
        _wait([p for i, p in enumerate(procs) if i not in victims], 3600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    alive = [i for i in range(args.peers) if i not in victims]
    codes = [procs[i].returncode for i in alive]
    dones = []
    for i in alive:
        dones += [r for r in read_log(out / f"peer{i}" / "log.jsonl") if r.get("event") == "done"]
    rec = {
        "figure": f"gossip_sgd_net.{name}",
        "algorithm": args.algorithm,
        "peers": args.peers,
        "rounds": args.rounds,
        "killed": len(victims),
        "killed_after_round": killed_at,
        "finished": sum(c == 0 for c in codes),
        "wall_s": time.monotonic() - started,
    }
    if all(c == 0 for c in codes):
        rec.update(_final_accuracy(cfg, out, alive))
        rec["bytes_per_peer"] = statistics.mean(d["bytes_sent"] for d in dones)
        rec["timeouts"] = sum(d["timeouts"] for d in dones)
        rec["duplicates"] = sum(d["duplicates"] for d in dones)
        rec["median_exchange_s"] = statistics.median(d["exchange_median_s"] for d in dones)
    return rec


def main() -> None:
    if sys.argv[1:2] == ["exchange-peer"]:
        return exchange_peer(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--algorithm", default="dfedavg")
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--kill-at", type=int, default=30)
    ap.add_argument("--numel", type=int, default=4 << 20)
    ap.add_argument("--exchange-rounds", type=int, default=11)
    ap.add_argument("--only", default="round_time,accuracy,kill")
    ap.add_argument("--keep", help="keep peer logs in this directory")
    args = ap.parse_args()
    only = set(args.only.split(","))
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gossip-net-"))
    try:
        if "round_time" in only:
            print(json.dumps(round_time(args, root)), flush=True)
        if "accuracy" in only:
            torch.set_num_threads(2)
            sim = simulate(_cfg(args))[-1]
            print(
                json.dumps(
                    {
                        "figure": "gossip_sgd_net.simulator",
                        "algorithm": args.algorithm,
                        "peers": args.peers,
                        **sim,
                    }
                ),
                flush=True,
            )
            net = train(args, root, "accuracy", 0)
            net["vs_simulator_points"] = (net.get("acc_avg", 0) - sim["acc_avg"]) * 100
            print(json.dumps(net), flush=True)
        if "kill" in only:
            print(json.dumps(train(args, root, "kill", 2)), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
