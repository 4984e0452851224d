"""bench/anchors/content_lattica.py: Lattica's bitswap moving the same bytes (bench/content.py).

    python bench/anchors/content_lattica.py --size-mib 256 [--runs 1] [--concurrency 16]

Our python (stdlib only) re-runs this file inside a fresh network namespace holding only loopback
(`unshare -n`, root; Lattica probes public STUN servers at start-up otherwise) with the Lattica
venv's python (bench/anchors/setup.sh). There a provider process puts the bytes as 1 MiB blocks
(`put_block`, Lattica's bitswap store) and a fetcher process, bootstrapped to it, gets every block
(`get_block`, --concurrency at a time from a thread pool: Lattica's core runs them in parallel) and
checks their sizes. One JSON line per run: {"seconds", "mib_per_s", "peak_rss_mib"}; or {"error"}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ANCHOR_DIR = Path(os.environ.get("LATTICE_ANCHOR_DIR", Path.home() / ".cache" / "lattice-anchors"))
VENV_PY = ANCHOR_DIR / ".venv-lattica" / "bin" / "python"
NETNS = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']
MIB = 1 << 20


def provide(size_mib: int, cids_file: str) -> None:
    sys.path.insert(0, str(HERE))
    import _common
    from rpc_lattica import build_node

    port = _common.free_tcp_port()
    data_dir = tempfile.mkdtemp(prefix="lattica-provider-")
    node, addr = build_node(data_dir, port)
    _common.wait_probe(port)
    cids = [node.put_block(os.urandom(MIB)) for _ in range(size_mib)]
    Path(cids_file).write_text("\n".join(cids))
    print(f"ADDR {addr}/p2p/{node.peer_id()}", flush=True)
    while True:  # until the fetcher closes our stdin
        ready, _, _ = select.select([sys.stdin], [], [], 1.0)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break
    node.close()
    shutil.rmtree(data_dir, ignore_errors=True)  # the blocks: as many bytes as were moved


def fetch(addr: str, cids_file: str, runs: int, concurrency: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    sys.path.insert(0, str(HERE))
    import _common
    from rpc_lattica import build_node

    cids = Path(cids_file).read_text().split()
    for run in range(runs):
        data_dir = tempfile.mkdtemp(prefix="lattica-fetcher-")
        node, _ = build_node(data_dir, _common.free_tcp_port(), [addr])
        time.sleep(1.0)  # connected and identified
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            sizes = list(pool.map(lambda c, n=node: len(n.get_block(c, timeout_secs=120)[1]), cids))
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the fetcher alone
        ok = sizes == [MIB] * len(cids)
        print(
            json.dumps(
                {
                    "run": run,
                    "seconds": seconds,
                    "mib_per_s": len(cids) / seconds,
                    "complete": ok,
                    "peak_rss_mib": peak,
                }
            ),
            flush=True,
        )
        node.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def inner(size_mib: int, runs: int, concurrency: int) -> None:
    """Inside the namespace, with the venv's python: the provider as a child, then the fetcher."""
    cids_file = tempfile.mktemp(prefix="lattica-cids-")
    prov = subprocess.Popen(
        [sys.executable, __file__, "--role", "provider", "--size-mib", str(size_mib), "--cids", cids_file],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = prov.stdout.readline().split()
        if not line or line[0] != "ADDR":
            print(json.dumps({"error": "the provider did not start"}), flush=True)
            return
        fetch(line[1], cids_file, runs, concurrency)
    finally:
        prov.stdin.close()
        prov.wait(30)
        os.unlink(cids_file)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument(
        "--role", choices=["driver", "inner", "provider"], default="driver", help=argparse.SUPPRESS
    )
    ap.add_argument("--cids", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()
    if args.role == "provider":
        provide(args.size_mib, args.cids)
    elif args.role == "inner":
        inner(args.size_mib, args.runs, args.concurrency)
    else:
        if not VENV_PY.exists():
            print(json.dumps({"error": f"no Lattica venv at {VENV_PY} (bash bench/anchors/setup.sh)"}))
            return
        cmd = [
            *NETNS,
            str(VENV_PY),
            __file__,
            "--role",
            "inner",
            "--size-mib",
            str(args.size_mib),
            "--runs",
            str(args.runs),
            "--concurrency",
            str(args.concurrency),
        ]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(json.dumps({"error": f"timed out after {args.timeout:.0f} s"}))
            return
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            print(json.dumps({"error": (out.stderr.strip().splitlines() or ["no output"])[-1][-300:]}))
        for ln in lines:
            print(ln, flush=True)


if __name__ == "__main__":
    main()
