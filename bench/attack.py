"""bench/attack: each volume attack of issue 16 against a daemon with a memory budget, with an honest
peer measuring before, during and after.

    python bench/attack.py [--only no_read_replies,slowloris] [--budget 768MiB] [--max-memory 384MiB]

Per attack, a fresh victim (`lattice-node run --max-memory M --enable-bench`) runs, as root, inside
a memory cgroup of ``--budget`` (so going over it kills it: the test of "never killed"). An honest
in-process node keeps a connection to the victim and makes a 16-byte RPC echo every 50 ms (calls on
an existing connection, their round trip), and a fresh identity opens a new connection (full
handshake) every 0.5 s from a non-exempt loopback address (127.0.200.1). Phases: 3 s baseline, the
attack, 2 s after. Attackers use other loopback addresses (127.0.x.y, not exempt from per-IP and
per-prefix budgets) where the attack lets them choose.

One JSON line per attack: victim peak RSS vs its budget, whether it survived, honest success rates
(existing connections: calls; new connections: handshakes) during the attack, the honest round
trip during / baseline (and the same ratio to a second daemon nobody attacks: what the machine
itself does to every round trip while the attacker's process and others share its cores), the
victim's CPU during the attack (cores), whether the attacker was banned, tracebacks in the victim's
log, the attack's own figures, and ``targets_met`` (peak <= budget, alive, calls >= 99 %, new
connections >= 95 %, round trip <= 2x, no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the attackers live with the attack tests

from attacks import transport as T  # noqa: E402
from attacks.rawpeer import RawPeer  # noqa: E402
from lattice.config import parse_size  # noqa: E402
from lattice.testing.daemons import Daemon, start_daemon  # noqa: E402

HONEST_FROM = "127.0.200.1"


@dataclass
class Victim:
    daemon: Daemon
    addr: str
    pid: int
    workdir: Path
    cgroup: Path | None


@dataclass
class Honest:
    """What the honest peer saw in one phase."""

    calls_ok: int = 0
    calls_failed: int = 0
    rtts: list[float] = field(default_factory=list)
    control_rtts: list[float] = field(default_factory=list)  # to a node nobody attacks (the machine)
    conns_ok: int = 0
    conns_failed: int = 0

    def row(self) -> dict:
        calls = self.calls_ok + self.calls_failed
        conns = self.conns_ok + self.conns_failed
        return {
            "calls": calls,
            "calls_success": round(self.calls_ok / calls, 4) if calls else None,
            "rtt_ms_median": round(statistics.median(self.rtts) * 1000, 3) if self.rtts else None,
            "control_rtt_ms_median": (
                round(statistics.median(self.control_rtts) * 1000, 3) if self.control_rtts else None
            ),
            "new_connections": conns,
            "new_connections_success": round(self.conns_ok / conns, 4) if conns else None,
        }


# -- memory cgroup (root only): v2 (memory.max) or v1 (memory.limit_in_bytes)
def make_cgroup(name: str, limit: int) -> Path | None:
    if os.geteuid() != 0:
        return None
    for root, limit_file in ((Path("/sys/fs/cgroup"), "memory.max"),
                             (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")):  # fmt: skip
        usable = (root / limit_file).exists() or (
            limit_file == "memory.max" and "memory" in _read(root / "cgroup.subtree_control")
        )
        if usable:
            path = root / name
            try:
                path.mkdir(exist_ok=True)
                (path / limit_file).write_text(str(limit))
                if (path / "memory.swap.max").exists():
                    (path / "memory.swap.max").write_text("0")
                return path
            except OSError:
                continue
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def cgroup_peak(path: Path) -> float | None:
    for name in ("memory.peak", "memory.max_usage_in_bytes"):
        if (path / name).exists():
            return int((path / name).read_text()) / 2**20
    return None


def remove_cgroup(path: Path) -> None:
    for _ in range(50):
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def start_victim(workdir: Path, name: str, max_memory: int, budget: int) -> Victim:
    cgroup = make_cgroup(f"lattice-attack-{os.getpid()}-{name}", budget)
    wrapper: list[str] = []
    if cgroup is not None:  # join the cgroup before exec: every byte of the victim is charged
        wrapper = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh"]
    args = ["--listen", "/ip4/127.0.0.1/tcp/0", "--enable-bench", "--max-memory", str(max_memory)]
    daemon = start_daemon(workdir, name, args, wrapper=wrapper)
    return Victim(daemon, daemon.info["addrs"][0], daemon.proc.pid, workdir, cgroup)


# -- the honest peer
async def honest_calls(node, addr: str, into: list[Honest], control: bool = False) -> None:
    """16-byte echo calls every 50 ms; to the victim (success and round trip) or, with
    ``control``, to a node nobody attacks (the round trip the machine itself allows)."""
    peer = await node.connect(addr)
    while True:
        phase = into[-1]
        start = trio.current_time()
        try:
            with trio.fail_after(2):
                await node.rpc.call(peer, "lattice.bench.echo", b"x" * 16, timeout=2)
            if control:
                phase.control_rtts.append(trio.current_time() - start)
                await trio.sleep(0.05)
                continue
            phase.calls_ok += 1
            phase.rtts.append(trio.current_time() - start)
        except Exception:
            phase.calls_failed += 1
            try:
                await node.connect(addr, timeout=2)
            except Exception:
                pass
        await trio.sleep(0.05)


async def honest_connections(addr: str, into: list[Honest]) -> None:
    while True:
        phase = into[-1]
        peer = RawPeer()
        try:
            with trio.fail_after(5):
                await peer.connect(addr, local_address=HONEST_FROM)
            phase.conns_ok += 1
        except Exception:
            phase.conns_failed += 1
        finally:
            await peer.aclose()
        await trio.sleep(0.5)


# -- the attacks (each: the victim -> what the attacker saw)
Attack = Callable[[Victim, argparse.Namespace], Awaitable[dict]]


async def attack_no_read_replies(v: Victim, args: argparse.Namespace) -> dict:
    from lattice.identity import KeyPair

    await T.store_big_records(v.addr, KeyPair.generate(), b"/attack/big", 3, 60_000)
    return await T.no_read_replies(v.addr, connections=4, streams=400, hold=args.seconds)


async def attack_connection_churn(v: Victim, args: argparse.Namespace) -> dict:
    sources = [f"127.0.{p}.{h}" for p in range(1, 17) for h in range(1, 5)]  # 64 IPs in 16 /24s
    return await T.connection_churn(v.addr, count=3000, parallel=64, victim_pid=v.pid, sources=sources)


async def attack_slowloris(v: Victim, args: argparse.Namespace) -> dict:
    sources = [f"127.0.{p}.{h}" for p in range(1, 17) for h in range(1, 5)]
    return await T.slowloris(v.addr, sources, per_source=4, hold=args.seconds, honest_from="127.0.99.1")


async def attack_dht_fill(v: Victim, args: argparse.Namespace) -> dict:
    from attacks import dht_fill

    stats = v.daemon.call("dht.status")  # a victim with default quotas: 1 GiB of 64 KiB records tried
    result = await dht_fill.fill(v.addr, identities=64, records_per_identity=256)
    result["stored_bytes_before"] = stats.get("stored_bytes")
    result["stored_bytes_after"] = v.daemon.call("dht.status").get("stored_bytes")
    return result


async def attack_crdt_gap(v: Victim, args: argparse.Namespace) -> dict:
    from attacks.crdt_gap import crdt_gap_flood

    v.daemon.call("crdt.open", doc="open-doc")  # a document without a writer list: anyone may write
    result = await crdt_gap_flood(v.addr, "open-doc", held=1100, quota_updates=40)
    status = v.daemon.call("crdt.status")
    result["victim_docs"] = status.get("docs", status) if isinstance(status, dict) else status
    return result


async def attack_gossip_flood(v: Victim, args: argparse.Namespace) -> dict:
    from attacks.gossip_flood import gossip_flood

    v.daemon.call("crdt.open", doc="shared")  # the victim subscribes to the document's topic
    return await gossip_flood(
        v.addr, "/lattice/crdt/shared", rpcs=300, seconds=args.seconds, victim_pid=v.pid
    )


async def attack_bad_prefix(v: Victim, args: argparse.Namespace) -> dict:
    from attacks.bad_prefix import bad_prefix_peer
    from lattice.transport import identify

    return await bad_prefix_peer(v.addr, [identify.PUSH_ID, "/lattice/kad/1.0.0"], hold=args.seconds)


async def attack_rpc_big_payloads(v: Victim, args: argparse.Namespace) -> dict:
    from attacks.rpc_flood import big_payloads

    missing = await big_payloads(v.addr, "no.such.method", count=3, size=1 << 30, victim_pid=v.pid)
    small = await big_payloads(v.addr, "lattice.bench.echo", count=3, size=1 << 30, victim_pid=v.pid)
    return {"missing_method": missing, "default_limit": small}


async def attack_rpc_stalled_calls(v: Victim, args: argparse.Namespace) -> dict:
    from attacks.rpc_flood import stalled_calls

    return await stalled_calls(
        v.addr, "lattice.bench.sink", identities=33, per_identity=64, hold=args.seconds
    )


async def attack_rpc_upload_squat(v: Victim, args: argparse.Namespace) -> dict:
    from attacks.rpc_flood import upload_squat

    return await upload_squat(v.addr, identities=2, nbytes=4 << 30)


async def attack_rpc_bad_shapes(v: Victim, args: argparse.Namespace) -> dict:
    from attacks.rpc_flood import bad_shapes

    return await bad_shapes(v.addr, "lattice.bench.echo")


ATTACKS: dict[str, Attack] = {
    "rpc_big_payloads": attack_rpc_big_payloads,
    "rpc_stalled_calls": attack_rpc_stalled_calls,
    "rpc_upload_squat": attack_rpc_upload_squat,
    "rpc_bad_shapes": attack_rpc_bad_shapes,
    "crdt_gap": attack_crdt_gap,
    "gossip_flood": attack_gossip_flood,
    "bad_prefix": attack_bad_prefix,
    "no_read_replies": attack_no_read_replies,
    "connection_churn": attack_connection_churn,
    "slowloris": attack_slowloris,
    "dht_fill": attack_dht_fill,
}


async def run_attacker(name: str, victim: Victim, args: argparse.Namespace) -> dict:
    """The attack in a process of its own (its CPU must not slow the honest peer's loop)."""
    argv = [sys.executable, __file__, "--attacker", name, "--target", victim.addr,
            "--victim-pid", str(victim.pid), "--control", str(victim.daemon.info["control"]),
            "--seconds", str(args.seconds)]  # fmt: skip
    proc = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    lines = [ln for ln in proc.stdout.decode().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"attacker_error": proc.stderr.decode()[-500:]}
    return json.loads(lines[-1])


def attacker_main(args: argparse.Namespace) -> None:
    """``--attacker NAME``: run one attack against ``--target`` and print its result."""
    info = {"control": args.control, "addrs": [args.target]}
    daemon = Daemon(args.attacker, None, info, 0.0)  # type: ignore[arg-type]  # no process handle here
    victim = Victim(daemon, args.target, args.victim_pid, Path("."), None)
    try:
        result = trio.run(ATTACKS[args.attacker], victim, args)
    except Exception as exc:  # the attacker's own failure is a result, not a bench crash
        result = {"attacker_error": f"{type(exc).__name__}: {exc}"[:300]}
    print(json.dumps(result), flush=True)


async def run_one(name: str, attack: Attack, args: argparse.Namespace, work: Path) -> dict:
    from lattice import Node, NodeConfig

    victim = start_victim(work, name, args.max_memory, args.budget)
    control = start_daemon(work, f"{name}-control", ["--listen", "/ip4/127.0.0.1/tcp/0", "--enable-bench"])
    phases: list[Honest] = [Honest()]
    cpu = [0.0, 0.0]
    result: dict = {}
    banned = None
    try:
        config = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=work / f"{name}-honest", control=False)
        async with Node(config) as honest, trio.open_nursery() as nursery:
            nursery.start_soon(honest_calls, honest, victim.addr, phases)
            nursery.start_soon(honest_calls, honest, control.info["addrs"][0], phases, True)
            nursery.start_soon(honest_connections, victim.addr, phases)
            await trio.sleep(args.baseline)
            phases.append(Honest())
            started = time.monotonic()
            cpu[0] = cpu_seconds(victim.pid)
            result = await run_attacker(name, victim, args)
            cpu[1] = cpu_seconds(victim.pid)
            result["attack_seconds"] = round(time.monotonic() - started, 2)
            result["victim_cores_during"] = round(
                (cpu[1] - cpu[0]) / max(1e-9, time.monotonic() - started), 2
            )
            phases.append(Honest())
            await trio.sleep(args.after)
            nursery.cancel_scope.cancel()
        if victim.daemon.proc.poll() is None:
            try:
                banned = victim.daemon.call("limits.bans").get("bans_total", 0) > 0
            except Exception:
                banned = None
    finally:
        alive = victim.daemon.proc.poll() is None
        peak = None
        if alive:
            with open(f"/proc/{victim.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        peak = int(line.split()[1]) / 1024
        if victim.cgroup is not None:  # what the cgroup was charged (page cache included)
            charged = cgroup_peak(victim.cgroup)
            peak = max(p for p in (peak, charged) if p is not None) if (peak or charged) else None
        log = victim.daemon.log() if Path(victim.daemon.info["log"]).exists() else ""
        victim.daemon.stop()
        control.stop()
        if victim.cgroup is not None:
            remove_cgroup(victim.cgroup)
    base, during, after = (p.row() for p in phases)
    ratio = control_ratio = None
    if base["rtt_ms_median"] and during["rtt_ms_median"]:
        ratio = round(during["rtt_ms_median"] / base["rtt_ms_median"], 2)
    if base["control_rtt_ms_median"] and during["control_rtt_ms_median"]:
        control_ratio = round(during["control_rtt_ms_median"] / base["control_rtt_ms_median"], 2)
    line = {
        "bench": "attack",
        "attack": name,
        "victim_alive": alive,
        "victim_peak_rss_mib": round(peak, 1) if peak else None,
        "budget_mib": args.budget >> 20,
        "max_memory_mib": args.max_memory >> 20,
        "in_cgroup": victim.cgroup is not None,
        "honest_baseline": base,
        "honest_during": during,
        "honest_after": after,
        "honest_rtt_ratio": ratio,
        # the same ratio to a node nobody attacks: what the attacker's and others' CPU on this
        # machine costs every process (the victim's own share is the difference)
        "control_rtt_ratio": control_ratio,
        "attacker_banned": banned,
        "tracebacks": log.count("Traceback"),
        "result": result,
    }
    line["targets_met"] = bool(
        alive
        and peak is not None
        and peak <= args.budget >> 20
        and (during["calls_success"] or 0) >= 0.99
        and (during["new_connections_success"] or 0) >= 0.95
        and (ratio is None or ratio <= 2.0)
        and line["tracebacks"] == 0
    )
    return line


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(ATTACKS)}")
    parser.add_argument("--budget", default="768MiB", help="the victim's memory cgroup (root)")
    parser.add_argument("--max-memory", default="384MiB", help="the victim's --max-memory")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the timed attacks")
    parser.add_argument("--baseline", type=float, default=3.0)
    parser.add_argument("--after", type=float, default=2.0)
    parser.add_argument("--attacker", help=argparse.SUPPRESS)  # internal: run one attack, print its result
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--victim-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--control", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attacker:
        attacker_main(args)
        return
    args.budget = parse_size(args.budget, "--budget")
    args.max_memory = parse_size(args.max_memory, "--max-memory")
    names = args.only.split(",") if args.only else list(ATTACKS)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        parser.error(f"unknown attacks: {', '.join(unknown)}")
    if os.geteuid() != 0:
        print("# not root: the victim runs without a memory cgroup (its peak RSS is still reported)")
    with tempfile.TemporaryDirectory(prefix="lattice-attack-") as tmp:
        for name in names:
            line = trio.run(run_one, name, ATTACKS[name], args, Path(tmp))
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
