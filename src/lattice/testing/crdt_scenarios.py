"""CRDT scenarios with real `lattice-node` processes, shared by tests and bench/crdt.

- :func:`sigkill_during_writes`: a daemon is SIGKILLed while clients write through its control socket;
  after a restart every acknowledged write must be there and the log must open cleanly.
- :func:`rogue_attack`: two honest daemons replicate an owner-only document while a rogue libp2p
  host (lattice.testing.crdt_rogue) sends them forged, unauthorized, oversized and garbage updates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from lattice.testing.daemons import Daemon, start_daemon, wait_for

LOOPBACK = ["--listen", "/ip4/127.0.0.1/tcp/0"]


def sigkill_during_writes(work: Path, writes: int = 1000, writers: int = 4, kill_after: int = 300) -> dict:
    """``writers`` client threads write ``writes`` keys in total (``crdt.set``, one signed, fsynced
    update each); the daemon is SIGKILLed once ``kill_after`` writes were acknowledged, restarted on
    the same data directory, and its document compared with the acknowledgements."""
    doc = "durable/doc"
    daemon = start_daemon(work, "victim", LOOPBACK)
    daemon.call("crdt.get", doc=doc)
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
        "write_after_restart": sum(version.values()) == len(present) + 1,
        "seconds_before_kill": round(restart_at - start, 2),
    }


def _count(present: dict, w: int) -> int:
    return sum(1 for k in present if k.startswith(f"w{w}-"))


ROGUE = [sys.executable, "-m", "lattice.testing.crdt_rogue"]


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
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=dict(os.environ))


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:] if path.exists() else ""


__all__ = ["rogue_attack", "sigkill_during_writes"]
