"""Flood scenario: a flooder on its own host (a network namespace, so its IP is not exempt from
bans) sends junk to one node at ``rate`` requests/s, then keeps re-dialing with fresh identities;
honest daemons in namespaces on the same bridge measure their latency before, during and after.

Shared by ``bench/flood.py`` and ``tests/test_flood.py`` (needs root: lattice.testing.netns).

Run as ``python -m attacks.flood (from tests/) TARGET_MULTIADDR --rate R --seconds S`` it is the flooder
(prints ``ready`` once its host is up, then one JSON line with what happened).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from crdt_scenarios import _start_all
from lattice.testing.daemons import Daemon, start_daemon

__all__ = ["flood_runs", "flooder"]

MAX_DIALS_IN_FLIGHT = 256  # the flooder's concurrent re-dials (a refused dial takes one round trip)


async def flooder(target: str, rate: float, seconds: float) -> dict:
    """Junk to ``target`` at ``rate``/s (one DHT stream of random bytes per request) over one
    connection until it is closed (the ban), then ``rate`` dials/s, each with a fresh identity."""
    import trio

    from lattice import _proto
    from lattice.errors import LatticeError
    from lattice.identity import KeyPair
    from lattice.multiaddr import Multiaddr
    from lattice.transport import open_host

    addr = Multiaddr.parse(target)
    ip, port = addr.tcp_target()
    out = {"sent": 0, "send_errors": 0, "dials": 0, "dials_refused": 0, "dials_accepted": 0,
           "dials_skipped": 0, "banned_after_s": None, "rate_before_ban": None}  # fmt: skip
    failures = (LatticeError, OSError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError)

    async with open_host(KeyPair.generate()) as host:

        async def dial(fresh: bool):
            sock = trio.socket.socket()
            try:
                with trio.fail_after(2):
                    await sock.connect((ip, port))
                    if fresh:  # a new identity for every re-dial: a peer-id ban alone cannot stop it
                        host.keypair = KeyPair.generate()
                    return await host.adopt(trio.SocketStream(sock), True, addr.without_peer(), None)
            except BaseException:
                sock.close()
                raise

        async def redial(in_flight: list[int]) -> None:
            t = trio.current_time()
            try:
                conn = await dial(True)
            except failures:
                out["dials_refused"] += 1
                refused_ms.append((trio.current_time() - t) * 1000)
            else:
                out["dials_accepted"] += 1  # a ban that does not hold: the IP should be refused
                await conn.close()
            finally:
                in_flight[0] -= 1

        async def junk(conn, sent_at: list[float]) -> None:
            try:
                with trio.fail_after(1):
                    stream = await host.new_stream(conn, ["/lattice/kad/1.0.0"])
                    payload = os.urandom(48)
                    await stream.write(_proto.delimited(payload))
                out["sent"] += 1
                sent_at.append(trio.current_time())
            except failures:
                out["send_errors"] += 1

        print("ready", flush=True)
        conn = await dial(False)
        start = trio.current_time()
        out["dials"] = 1
        interval = 1.0 / rate
        next_at = start
        in_flight = [0]
        refused_ms: list[float] = []
        sent_at: list[float] = []
        launched_at: list[float] = []
        async with trio.open_nursery() as nursery:
            while (now := trio.current_time()) - start < seconds:
                next_at += interval
                if next_at > now:
                    await trio.sleep(next_at - now)
                if out["banned_after_s"] is None:
                    if not conn.closed:  # one request per tick, concurrently: the pace holds
                        nursery.start_soon(junk, conn, sent_at)
                        launched_at.append(trio.current_time())
                        continue
                    t = trio.current_time() - start
                    out["banned_after_s"] = round(t, 4)
                    out["junk_launched"] = len(launched_at)
                    if len(launched_at) > 1:  # the pace the junk requests were sent at
                        span = launched_at[-1] - launched_at[0]
                        out["rate_before_ban"] = round((len(launched_at) - 1) / span, 1)
                    continue
                if in_flight[0] >= MAX_DIALS_IN_FLIGHT:
                    out["dials_skipped"] += 1
                    continue
                in_flight[0] += 1
                out["dials"] += 1
                nursery.start_soon(redial, in_flight)
            elapsed = trio.current_time() - start
            nursery.cancel_scope.deadline = trio.current_time() + 2.5
        out["elapsed_s"] = round(elapsed, 3)
        out["refused_dial_ms_median"] = round(statistics.median(refused_ms), 3) if refused_ms else None
        cpu = os.times()
        out["flooder_cpu"] = round((cpu.user + cpu.system) / elapsed, 3)  # incl. its start-up
        out["attempts_per_s"] = round((out["sent"] + out["dials"]) / elapsed, 1)
        if out["banned_after_s"] is not None:
            after = elapsed - out["banned_after_s"]
            out["dials_per_s_after_ban"] = round((out["dials"] - 1) / after, 1) if after > 0 else None
    return out


# -- the scenario ------------------------------------------------------------------------------


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _measure(clients: dict, peers: dict, seconds: float) -> dict:
    """Round trips (ms) for ``seconds``: ping and a small echo RPC from the observer to the target
    and to the other honest node. Failed calls are counted, not hidden."""
    kinds = ("ping_target", "ping_other", "rpc_target", "rpc_other")
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    errors = 0
    obs = clients["observer"]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name in ("target", "other"):
            try:
                samples[f"ping_{name}"] += [r * 1000 for r in obs.ping(peers[name], count=3, timeout=5)]
                r = obs.rpc.bench(peers[name], 16, count=3, direction="echo")
                samples[f"rpc_{name}"] += [t * 1000 for t in r["times_s"]]
            except Exception:  # a timeout or refused call under the flood is a result, not a crash
                errors += 1
    out: dict = {k: _median(v) for k, v in samples.items()}
    out["samples"] = sum(len(v) for v in samples.values())
    out["errors"] = errors
    return out


def _cpu_s(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _cores(pid: int, cpu0: float, t0: float) -> float:
    """CPU cores ``pid`` used since (``cpu0``, ``t0``)."""
    return round((_cpu_s(pid) - cpu0) / (time.monotonic() - t0), 3)


def flood_runs(work: Path, runs: int = 5, rate: float = 1000.0, seconds: float = 4.0) -> dict:
    """``runs`` floods of the node "target" by hosts f0, f1, ... (one fresh IP per run); per run,
    honest latency with no flooder (the baseline), during the flood and after it."""
    from lattice.testing.netns import Testbed

    flooders = [f"f{i}" for i in range(runs)]
    honest = ["target", "observer", "other"]
    with Testbed(public=[*honest, *flooders], sites=()) as tb:
        daemons: dict[str, Daemon] = {}

        def args(name: str) -> list[str]:
            own = ["--listen", f"/ip4/{tb.ip(name)}/tcp/4001", "--reachability", "public", "--enable-bench"]
            return own + (["--bootstrap", daemons["target"].info["addrs"][0]] if daemons else [])

        daemons["target"] = start_daemon(work, "target", args("target"), testbed=tb, host="target")
        try:
            daemons.update(zip(honest[1:], _start_all(work, honest[1:], args, tb), strict=True))
            return _runs(tb, daemons, flooders, rate, seconds)
        finally:
            for d in daemons.values():
                d.stop()


def _runs(tb, daemons: dict[str, Daemon], flooders: list[str], rate: float, seconds: float) -> dict:
    from lattice.control.client import Client

    peers = {n: d.peer_id for n, d in daemons.items()}
    target = daemons["target"]
    results = []
    with contextlib.ExitStack() as stack:
        clients = {n: stack.enter_context(Client(d.info["control"])) for n, d in daemons.items()}
        for n in ("target", "other"):
            clients["observer"].connect(daemons[n].info["addrs"][0])
        _measure(clients, peers, 0.5)  # warm-up: connections, RPC lanes
        for host in flooders:
            run: dict = {"flooder_ip": tb.ip(host)}
            cpu0, t0 = _cpu_s(target.proc.pid), time.monotonic()
            run["before"] = _measure(clients, peers, seconds)
            run["target_cpu_before"] = _cores(target.proc.pid, cpu0, t0)
            lim0 = clients["target"].call("metrics")
            argv = [sys.executable, "-m", "attacks.flood", target.info["addrs"][0],
                    "--rate", str(rate), "--seconds", str(seconds + 1.0)]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            proc = tb.popen(host, argv, stdout=subprocess.PIPE, text=True, env=env)
            try:
                line = proc.stdout.readline()  # "ready": its imports are done, the flood starts now
                if line.strip() != "ready":
                    raise RuntimeError(f"flooder did not start: {line!r}")
                time.sleep(0.5)  # the ban is under way
                cpu0, t0 = _cpu_s(target.proc.pid), time.monotonic()
                run["during"] = _measure(clients, peers, seconds)
                run["target_cpu_during"] = _cores(target.proc.pid, cpu0, t0)
                report = proc.communicate(timeout=seconds + 30)[0].strip().splitlines()
                run["flooder"] = json.loads(report[-1])
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            lim1 = clients["target"].call("metrics")
            run["after"] = _measure(clients, peers, seconds)
            limits = lim1["limits"]
            run["target"] = {
                "bans": limits["bans_total"] - lim0["limits"]["bans_total"],
                "flooder_ip_banned": tb.ip(host) in limits["banned_ips"],
                "refused_connections": limits["refused_connections"] - lim0["limits"]["refused_connections"],
                "refused_at_accept": lim1["host"].get("inbound_refused_limits", 0)
                - lim0["host"].get("inbound_refused_limits", 0),
                "refused_after_handshake": lim1["host"].get("inbound_refused_banned", 0)
                - lim0["host"].get("inbound_refused_banned", 0),
                "observer_connected": any(
                    p["peer_id"] == peers["observer"] for p in clients["target"].call("peers")
                ),
            }
            results.append(run)
    return {"runs": results}


def main() -> None:
    parser = argparse.ArgumentParser(description="the flooder of tests/attacks/flood.py")
    parser.add_argument("target")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    import trio

    print(json.dumps(trio.run(flooder, args.target, args.rate, args.seconds)), flush=True)


if __name__ == "__main__":
    main()
