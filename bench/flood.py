"""bench/flood: one peer floods one node of a local testnet with junk (1,000 requests/s); is it
banned, and do the other peers' round trips to that node stay within 2x of normal?

    python bench/flood.py [--runs 5] [--rate 1000] [--seconds 4]

Per run: a fresh flooder identity on its own loopback address (127.0.0.2, .3, ...: the testnet's
127.0.0.1 is exempt from IP bans) opens a DHT stream per request and sends random bytes. Baseline
in the same run: the observer's ping RTT to the target (and to an unflooded node) right before
the flood; figures are during/before ratios. The flooder keeps re-dialing after the ban; those
dials are refused at accept (IP ban) or right after the handshake (peer ban). The flooder runs
at niceness 10 (``--nice``): on one machine its own CPU would otherwise slow every node, flooded
or not (the ``rtt_ratio_other_node`` line shows how much of the effect is the machine, not the
target).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import emit  # noqa: E402


async def flooder(target: str, rate: float, seconds: float, source_ip: str) -> dict:
    """Send junk to ``target`` at ``rate`` requests/s for ``seconds``; report what happened."""
    import trio

    from lattice import _proto
    from lattice.errors import LatticeError
    from lattice.identity import KeyPair
    from lattice.transport import open_host
    from lattice.transport.multiaddr import Multiaddr

    addr = Multiaddr.parse(target)
    ip, port = addr.tcp_target()
    out = {"sent": 0, "dials": 0, "dials_refused": 0, "banned_after_s": None, "source_ip": source_ip}
    async with open_host(KeyPair.generate()) as host:
        conn = None
        start = trio.current_time()
        interval = 1.0 / rate
        next_at = start
        while trio.current_time() - start < seconds:
            next_at += interval
            delay = next_at - trio.current_time()
            if delay > 0:
                await trio.sleep(delay)
            try:
                if conn is None or conn.closed:
                    if conn is not None and out["banned_after_s"] is None:
                        out["banned_after_s"] = round(trio.current_time() - start, 3)
                    out["dials"] += 1
                    with trio.fail_after(2):
                        sock = trio.socket.socket()
                        await sock.bind((source_ip, 0))
                        await sock.connect((ip, port))
                        conn = await host.adopt(
                            trio.SocketStream(sock), True, addr.without_peer(), addr.peer_id
                        )
                with trio.fail_after(1):
                    stream = await host.new_stream(conn, ["/lattice/kad/1.0.0"])
                    junk = os.urandom(48)
                    await stream.write(_proto.encode_uvarint(len(junk)) + junk)
                out["sent"] += 1
            except (LatticeError, OSError, trio.TooSlowError, trio.BrokenResourceError):
                out["dials_refused"] += conn is None or conn.closed
                if conn is not None and conn.closed and out["banned_after_s"] is None:
                    out["banned_after_s"] = round(trio.current_time() - start, 3)
    return out


def _rtts(client, peer: str, count: int) -> list[float]:
    return [r * 1000 for r in client.ping(peer, count=count)]


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--flooder", metavar="TARGET", help=argparse.SUPPRESS)
    parser.add_argument("--source-ip", default="127.0.0.2", help=argparse.SUPPRESS)
    parser.add_argument("--nice", type=int, default=10, help="niceness of the flooder process (default 10)")
    args = parser.parse_args()
    if args.flooder:
        import trio

        os.nice(args.nice)  # the flooder stands for another machine: its own CPU is not the target's cost

        print(
            json.dumps(trio.run(flooder, args.flooder, args.rate, args.seconds, args.source_ip)), flush=True
        )
        return

    from lattice.control.client import Client
    from lattice.swarm.testnet import Testnet

    before, during, before_other, during_other, banned_after, sent, bans = [], [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp, Testnet(Path(tmp), args.nodes) as net:
        net.wait_dht(timeout=30)
        target, observer, other = net.nodes[1], net.nodes[2], net.nodes[3]
        with Client(observer.info["control"]) as obs, Client(target.info["control"]) as tgt:
            obs.connect(target.info["addrs"][0])
            obs.connect(other.info["addrs"][0])
            for run in range(args.runs):
                source_ip = f"127.0.0.{run + 2}"
                b = _rtts(obs, target.info["peer_id"], 30)
                bo = _rtts(obs, other.info["peer_id"], 30)
                cmd = [sys.executable, __file__, "--flooder", target.info["addrs"][0], "--rate",
                       str(args.rate), "--seconds", str(args.seconds), "--source-ip", source_ip,
                       "--nice", str(args.nice)]  # fmt: skip
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
                time.sleep(min(1.0, args.seconds / 3))  # the flood (and the ban) under way
                d, do = [], []
                deadline = time.monotonic() + args.seconds - 1.0
                while time.monotonic() < deadline:
                    d += _rtts(obs, target.info["peer_id"], 5)
                    do += _rtts(obs, other.info["peer_id"], 5)
                report = json.loads(proc.communicate(timeout=args.seconds + 30)[0].strip().splitlines()[-1])
                limits = tgt.call("metrics")["limits"]
                before.append(statistics.median(b))
                during.append(statistics.median(d))
                before_other.append(statistics.median(bo))
                during_other.append(statistics.median(do))
                banned_after.append(report["banned_after_s"] if report["banned_after_s"] is not None else -1)
                sent.append(report["sent"])
                bans.append(limits["bans_total"])
                print(json.dumps({"run": run, "flooder": report, "target_limits": {
                    k: limits[k] for k in ("bans_total", "refused_connections", "throttled", "banned_ips")}}),
                    file=sys.stderr, flush=True)  # fmt: skip
    emit("flood", "lattice", "rtt_to_target_before_ms", before)
    emit("flood", "lattice", "rtt_to_target_during_ms", during)
    emit(
        "flood",
        "lattice",
        "rtt_ratio_target",
        [d / b for d, b in zip(during, before, strict=True)],
        target=2.0,
    )
    emit("flood", "lattice", "rtt_ratio_other_node",
         [d / b for d, b in zip(during_other, before_other, strict=True)], target=2.0)  # fmt: skip
    emit("flood", "lattice", "banned_after_s", banned_after, rate=args.rate)
    emit("flood", "lattice", "junk_accepted_before_ban", sent)
    emit("flood", "lattice", "bans_total_on_target", bans)


if __name__ == "__main__":
    main()
