"""CRDT scenarios with real `lattice-node` processes, shared by tests and bench/crdt.

- :func:`sigkill_during_writes`: a daemon is SIGKILLed while clients write through its control socket;
  after a restart every acknowledged write must be there and the log must open cleanly.
- :func:`rogue_attack`: two honest daemons replicate an owner-only document while a rogue libp2p
  host (tests/attacks/crdt_rogue.py) sends them forged, unauthorized, oversized and garbage updates.
- :func:`partition_heal`: daemons in network namespaces on one bridge (lattice.testing.netns) are
  split in two halves by an nftables rule on the bridge, edit on both sides, and are healed; the
  figure is the time from the heal to identical documents everywhere (needs root).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from lattice.testing.daemons import Daemon, start_daemon, wait_for
from lattice.testing.netns import Testbed

LOOPBACK = ["--listen", "/ip4/127.0.0.1/tcp/0"]


def sigkill_during_writes(work: Path, writes: int = 1000, writers: int = 4, kill_after: int = 300) -> dict:
    """``writers`` client threads write ``writes`` keys in total (``crdt.set``, one signed, fsynced
    update each); the daemon is SIGKILLed once ``kill_after`` writes were acknowledged, restarted on
    the same data directory, and its document compared with the acknowledgements."""
    doc = "durable/doc"
    first = time.monotonic()
    daemon = start_daemon(work, "victim", LOOPBACK)
    daemon.call("crdt.get", doc=doc)
    first_open = time.monotonic() - first  # the baseline: a fresh daemon serving an empty document
    acked: list[str] = []
    lock = threading.Lock()
    per_writer = writes // writers

    def writer(w: int) -> None:
        try:
            with daemon.client() as client:
                for i in range(per_writer):
                    key = f"w{w}-{i}"
                    client.call("crdt.set", doc=doc, key=key, value=i)
                    with lock:  # only a reply counts as an acknowledgement
                        acked.append(key)
        except Exception:  # the daemon died under us: expected
            return

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(writers)]
    start = time.monotonic()
    for t in threads:
        t.start()
    wait_for(lambda: len(acked) >= kill_after or not any(t.is_alive() for t in threads), 60, "writes")
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    for t in threads:
        t.join(10)
    with lock:
        acknowledged = list(acked)
    restart_at = time.monotonic()
    again = start_daemon(work, "victim", LOOPBACK)
    try:
        present = again.call("crdt.get", doc=doc)
        opened = time.monotonic() - restart_at
        status = again.call("crdt.status")["docs"][doc]
        again.call("crdt.set", doc=doc, key="after-restart", value=1)  # the log still takes writes
        version = again.call("crdt.status")["docs"][doc]["version"]
    finally:
        again.stop()
    lost = [k for k in acknowledged if k not in present]
    wrong = [k for k, v in present.items() if v != int(k.rpartition("-")[2])]
    # per writer, what is present is a prefix of what it wrote (nothing half-applied or reordered)
    prefixes = all(
        {k for k in present if k.startswith(f"w{w}-")} == {f"w{w}-{i}" for i in range(_count(present, w))}
        for w in range(writers)
    )
    return {
        "acked": len(acknowledged),
        "present": len(present),
        "lost_acked": len(lost),
        "wrong_values": len(wrong),
        "prefixes": prefixes,
        "in_flight_kept": len(present) - len(acknowledged),
        "log_dropped_bytes": status["log_dropped_bytes"],
        "restart_open_s": round(opened, 3),
        "fresh_open_s": round(first_open, 3),
        "write_after_restart": sum(version.values()) == len(present) + 1,
        "seconds_before_kill": round(restart_at - start, 2),
    }


def _count(present: dict, w: int) -> int:
    return sum(1 for k in present if k.startswith(f"w{w}-"))


ROGUE = [sys.executable, "-m", "attacks.crdt_rogue"]


def rogue_attack(work: Path, rounds: int = 5, honest_writes: int = 200) -> dict:
    """Owner daemon A and replica B share document "owned" (writers: A only) and "public" (anyone);
    a rogue host attacks B (and A) while A keeps writing. Returns what B ended up with."""
    a = start_daemon(work, "owner", LOOPBACK)
    b = start_daemon(work, "replica", [*LOOPBACK, "--bootstrap", a.info["addrs"][0]])
    try:
        for d in (a, b):
            d.call("crdt.open", doc="owned", writers=[a.peer_id])
            d.call("crdt.open", doc="public")
        wait_for(lambda: b.call("peers"), 10, "connection")
        a.call("crdt.set", doc="owned", key="before", value=0)
        a.call("crdt.set", doc="public", key="hello", value="world")
        wait_for(lambda: "hello" in b.call("crdt.get", doc="public"), 10, "replication")
        wait_for(lambda: "before" in b.call("crdt.get", doc="owned"), 10, "replication")

        done = threading.Event()
        during: list[float] = []

        def honest() -> None:  # A keeps writing during the attack; B must keep receiving
            with a.client() as client:
                for i in range(honest_writes):
                    if done.is_set():
                        return
                    client.call("crdt.set", doc="owned", key=f"k{i}", value=i)
                    time.sleep(0.005)

        writer = threading.Thread(target=honest, daemon=True)
        writer.start()
        procs = [_rogue(d, a, rounds, work / f"rogue-{d.name}.log") for d in (b, a)]
        outputs = []
        try:
            for proc in procs:
                out, _ = proc.communicate(timeout=120)
                outputs.append(json.loads(out.strip().splitlines()[-1]) if out.strip() else {})
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        writer.join(60)
        done.set()
        expected = {"before": 0, **{f"k{i}": i for i in range(honest_writes)}}
        t = time.monotonic()
        wait_for(lambda: b.call("crdt.get", doc="owned") == expected, 30, "honest replication")
        during.append(time.monotonic() - t)
        # after the attack, honest replication still works, both ways on the open document
        b.call("crdt.set", doc="public", key="from-b", value=1)
        wait_for(lambda: "from-b" in a.call("crdt.get", doc="public"), 10, "replication after attack")
        status_b, status_a = b.call("crdt.status"), a.call("crdt.status")
        return {
            "sent": outputs,
            "owned_b": b.call("crdt.get", doc="owned"),
            "owned_a": a.call("crdt.get", doc="owned"),
            "public_b": b.call("crdt.get", doc="public"),
            "public_a": a.call("crdt.get", doc="public"),
            "expected_owned": expected,
            "status_b": status_b,
            "status_a": status_a,
            "bans_b": b.call("limits.bans"),
            "rogue_exit": [p.returncode for p in procs],
            "honest": [a.peer_id, b.peer_id],
            "catch_up_s": round(during[0], 3),
            "logs": [_tail(work / f"rogue-{d.name}.log") for d in (b, a)],
        }
    finally:
        b.stop()
        a.stop()


def _rogue(target: Daemon, owner: Daemon, rounds: int, log: Path) -> subprocess.Popen:
    argv = [*ROGUE, "--target", target.info["addrs"][0], "--doc", "owned", "--owner", owner.peer_id,
            "--open-doc", "public", "--rounds", str(rounds)]  # fmt: skip
    err = log.open("w")
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def _drop_between(tb: Testbed, left: list[str], right: list[str]) -> None:
    """Drop every IPv4 packet between the two groups at the bridge (both directions)."""
    a = ", ".join(tb.ip(h) for h in left)
    b = ", ".join(tb.ip(h) for h in right)
    rules = f"""table bridge lt_partition {{
    chain forward {{
        type filter hook forward priority 0; policy accept;
        ip saddr {{ {a} }} ip daddr {{ {b} }} drop
        ip saddr {{ {b} }} ip daddr {{ {a} }} drop
    }}
}}"""
    r = tb.run("internet", ["nft", "-f", "-"], input=rules)
    if r.returncode != 0:
        raise RuntimeError(f"nft: {r.stderr.strip()}")


def _heal(tb: Testbed) -> None:
    r = tb.run("internet", ["nft", "delete", "table", "bridge", "lt_partition"])
    if r.returncode != 0:
        raise RuntimeError(f"nft: {r.stderr.strip()}")


def partition_heal(
    work: Path, nodes: int = 8, partition_s: float = 30.0, writes: int = 100, keepalive: float | None = None
) -> dict:
    """``nodes`` daemons (a full mesh) split ``nodes/2 | nodes/2`` for ``partition_s`` seconds; each
    node writes ``writes`` keys during the partition and both halves write one shared key; then the
    partition heals. Returns the time from the heal to identical version vectors on every node (and
    identical maps, checked after), and what happened to the connections meanwhile. ``keepalive``
    overrides the nodes' keep-alive interval (default: the node default)."""
    doc = "partition/doc"
    names = [f"n{i}" for i in range(nodes)]
    left, right = names[: nodes // 2], names[nodes // 2 :]
    extra: list[str] = []
    if keepalive is not None:
        config = work / "node.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(f"[node]\nkeepalive_interval = {keepalive}\n")
        extra = ["--config", str(config)]
    with Testbed(public=names, sites=()) as tb:
        daemons: list[Daemon] = []

        def args(name: str) -> list[str]:
            own = ["--listen", f"/ip4/{tb.ip(name)}/tcp/4001", "--reachability", "public", *extra]
            return own + (["--bootstrap", daemons[0].info["addrs"][0]] if daemons else [])

        daemons.append(start_daemon(work, names[0], args(names[0]), testbed=tb, host=names[0]))
        try:
            daemons.extend(_start_all(work, names[1:], args, tb))
            return _partition_run(tb, daemons, doc, left, right, partition_s, writes)
        finally:
            _stop_all(daemons)


def _start_all(work: Path, names: list[str], args, tb: Testbed) -> list[Daemon]:
    """Start daemons in parallel (each start is mostly waiting for Python to import)."""
    started: dict[str, Daemon] = {}
    errors: list[Exception] = []

    def one(name: str) -> None:
        try:
            started[name] = start_daemon(work, name, args(name), testbed=tb, host=name)
        except Exception as exc:  # re-raised below, after the others are accounted for
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors or len(started) != len(names):
        _stop_all(list(started.values()))
        raise errors[0] if errors else RuntimeError("daemons did not start")
    return [started[n] for n in names]


def _stop_all(daemons: list[Daemon]) -> None:
    for d in daemons:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
    for d in daemons:
        d.stop()  # waits (and kills one that ignores SIGTERM)


def _versions(daemons: list[Daemon], doc: str) -> list[dict]:
    return [d.call("crdt.status")["docs"][doc]["version"] for d in daemons]


def _peer_counts(daemons: list[Daemon]) -> list[int]:
    return [len(d.call("peers")) for d in daemons]


def _partition_run(tb, daemons, doc, left, right, partition_s, writes) -> dict:
    n = len(daemons)
    for d in daemons:
        d.call("crdt.open", doc=doc)
    wait_for(lambda: all(c == n - 1 for c in _peer_counts(daemons)), 30, "a full mesh", interval=0.2)
    for d in daemons:
        d.call("crdt.set", doc=doc, key=f"warm-{d.name}", value=0)
    wait_for(lambda: all(len(v) == n for v in _versions(daemons, doc)), 30, "warm-up", interval=0.1)

    start = time.monotonic()
    _drop_between(tb, left, right)
    side = {d.name: ("L" if d.name in left else "R") for d in daemons}
    threads = []
    for d in daemons:  # every node writes at once, on both sides

        def fill(d: Daemon = d) -> None:
            with d.client() as client:
                client.call("crdt.fill", doc=doc, count=writes, prefix=f"{side[d.name]}-{d.name}-")

        threads.append(threading.Thread(target=fill, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    daemons[0].call("crdt.set", doc=doc, key="leader", value="left")
    daemons[-1].call("crdt.set", doc=doc, key="leader", value="right")
    half = len(left)

    def sides_converged() -> bool:
        v = _versions(daemons, doc)
        return all(x == v[0] for x in v[:half]) and all(x == v[half] for x in v[half:]) and v[0] != v[half]

    wait_for(sides_converged, max(10.0, partition_s), "each side converging", interval=0.1)
    side_converged_s = time.monotonic() - start
    time.sleep(max(0.0, partition_s - (time.monotonic() - start)))
    peers_before_heal = _peer_counts(daemons)
    _heal(tb)
    healed = time.monotonic()
    reconnected_s = None
    identical_s = None
    deadline = healed + 60
    while time.monotonic() < deadline:
        v = _versions(daemons, doc)
        if reconnected_s is None and all(c == n - 1 for c in _peer_counts(daemons)):
            reconnected_s = time.monotonic() - healed
        if all(x == v[0] for x in v) and sum(v[0].values()) == n * (1 + writes) + 2:
            identical_s = time.monotonic() - healed
            break
        time.sleep(0.02)
    maps = [d.call("crdt.get", doc=doc) for d in daemons]
    if reconnected_s is None:
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: all(c == n - 1 for c in _peer_counts(daemons)), 30, "reconnection", interval=0.2)
            reconnected_s = time.monotonic() - healed
    return {
        "nodes": n,
        "partition_s": round(healed - start, 1),
        "writes_per_node": writes,
        "side_converged_s": round(side_converged_s, 2),
        "peers_before_heal": peers_before_heal,
        "heal_to_identical_s": None if identical_s is None else round(identical_s, 3),
        "heal_to_full_mesh_s": None if reconnected_s is None else round(reconnected_s, 3),
        "identical_maps": all(m == maps[0] for m in maps),
        "keys": len(maps[0]),
        "expected_keys": n * (1 + writes) + 1,
        "leader": maps[0].get("leader"),
    }


__all__ = ["partition_heal", "rogue_attack", "sigkill_during_writes"]
