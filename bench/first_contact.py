"""bench/first_contact: what a first contact costs on emulated wide-area links, in link RTTs.

    python bench/first_contact.py [--presets continental,intercontinental] [--runs 15]
                                  [--trees PATH[,PATH...]]

Two hosts of the preset (lattice.testing.wan, root); a daemon listens on host b; a fresh process
on host a opens a host and, ``--runs`` times, dials b (TCP + the libp2p upgrade: ``connect_rtt``),
pings it (``connect_ping_rtt``: connect + one stream + one ping), and closes the connection. With
``--trees`` every tree's ``src`` is run in turn (runs interleaved, same testbed, same run): e.g. a
checkout of the commit before a change and this one. One JSON line per preset and tree, medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from lattice.testing.daemons import start_daemon
from lattice.testing.wan import WanTestbed, wan_unavailable

PORT = 4001
DIALER = r"""
import json, sys, time, trio
from lattice.identity import KeyPair
from lattice.transport import open_host, ping

async def main(addr, runs):
    connect, first_ping = [], []
    async with open_host(KeyPair.generate()) as host:
        for _ in range(runs):
            t0 = time.perf_counter()
            conn = await host.connect(addr)
            t1 = time.perf_counter()
            await ping.ping(host, conn.remote_peer, count=1)
            t2 = time.perf_counter()
            connect.append(t1 - t0)
            first_ping.append(t2 - t0)
            await conn.close()
            await trio.sleep(0.1)
    print(json.dumps({"connect": connect, "connect_ping": first_ping}))

trio.run(main, sys.argv[1], int(sys.argv[2]))
"""


def run_tree(tb: WanTestbed, tree: Path, work: Path, runs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]  # the daemon's process inherits it
    try:
        daemon = start_daemon(work, f"b-{abs(hash(tree))}", ["--listen", f"/ip4/0.0.0.0/tcp/{PORT}"], tb, "b")
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = saved
    try:
        addr = f"/ip4/{tb.ip('b')}/tcp/{PORT}/p2p/{daemon.peer_id}"
        done = tb.run("a", [sys.executable, "-c", DIALER, addr, str(runs)], env=env, timeout=300)
        if done.returncode:
            raise RuntimeError(done.stderr[-2000:])
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        daemon.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="continental,intercontinental")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--trees", default=str(Path(__file__).resolve().parent.parent))
    ap.add_argument(
        "--rounds", type=int, default=2, help="each tree runs --runs dials this many times, interleaved"
    )
    args = ap.parse_args()
    if (why := wan_unavailable()) is not None:
        print(json.dumps({"bench": "first_contact", "skipped": why}))
        return 0
    print(json.dumps({"bench": "first_contact", "load": os.getloadavg()[0]}), flush=True)
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    for preset in args.presets.split(","):
        with WanTestbed(["a", "b"], preset) as tb, tempfile.TemporaryDirectory() as tmp:
            rtt = tb.rtt_ms("a", "b") / 1000
            got: dict[Path, dict[str, list[float]]] = {t: {"connect": [], "connect_ping": []} for t in trees}
            for _ in range(args.rounds):
                for tree in trees:
                    for key, values in run_tree(tb, tree, Path(tmp), args.runs).items():
                        got[tree][key] += values
            for tree in trees:
                line = {"bench": "first_contact", "preset": preset, "tree": str(tree), "rtt_ms": rtt * 1000}
                for key, values in got[tree].items():
                    line[f"{key}_rtt"] = round(statistics.median(values) / rtt, 2)
                    line[f"{key}_rtt_p90"] = round(sorted(values)[int(0.9 * (len(values) - 1))] / rtt, 2)
                print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
