"""bench/content_cpu: CPU milliseconds per MiB of a `content.get`, two source trees side by side.

    python bench/content_cpu.py BASE_TREE BRANCH_TREE [--gets 8] [--size 256MiB]
    python bench/content_cpu.py --disk [--runs 5]
    python bench/content_cpu.py --four [--pin] [--runs 3] [--size 1GiB]

Each tree (a directory holding ``src/lattice``, e.g. ``git archive <rev> src | tar -x -C DIR``)
gets its own provider and fetcher daemon (PYTHONPATH set per daemon); gets from one provider
alternate between the trees one by one (ABBA...), so both see the same load on a shared machine.
Per tree: the median over gets of each daemon's CPU (utime + stime from /proc) per MiB, and MiB/s.
The fetcher's ``chunks_copied`` (O_DIRECT bounce copies) and ``write_calls`` (worker-thread hops)
are printed when the tree has them.

``--disk``: the fetcher's disk path alone, in this process (this tree): CPU per MiB of an
``O_DIRECT`` write from a page-aligned buffer vs through the bounce copy, and of verify + write
with one worker-thread hop per chunk vs per batch of 4.

``--four``: this tree's gets from one provider (``discover=False``) and from four, alternated, each
with MiB/s and the CPU per MiB of the providers (summed) and of the fetcher: on one 2-core machine
the four provider processes compete with the fetcher for its cores. ``--pin`` puts every thread of
the fetcher on CPU 0 and the providers on CPU 1 (``sched_setaffinity``), as if each side had a
machine of its own.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, start_daemon, stop

from lattice import Client
from lattice.config import parse_size

MIB = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def one_get(pair: dict, cid: str, size: int) -> tuple[float, float, float]:
    """(provider ms/MiB, fetcher ms/MiB, MiB/s) of one get; the copy is gc'ed after."""
    prov, fetch = pair["provider"].pid, pair["fetcher"].pid
    c0p, c0f, t0 = cpu_s(prov), cpu_s(fetch), time.perf_counter()
    with Client(pair["fetcher_info"]["control"], timeout=600) as client:
        for _ in client.stream("content.get", cid=cid, providers=[pair["addr"]], pin=False, output=None):
            pass
        seconds = time.perf_counter() - t0
        client.content.gc()
    mib = size / MIB
    return (cpu_s(prov) - c0p) / mib * 1e3, (cpu_s(fetch) - c0f) / mib * 1e3, mib / seconds


def random_blob(prefix: str, size: int) -> tuple[Path, Path]:
    """A fresh work directory and a file of ``size`` random bytes in it."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    blob = work / "blob"
    with open(blob, "wb") as fh:
        for _ in range(size // MIB):
            fh.write(os.urandom(MIB))
    return work, blob


def trees(args) -> None:
    size = parse_size(args.size, "--size")
    work, blob = random_blob("content-cpu-", size)
    pairs: list[dict] = []
    env = os.environ.get("PYTHONPATH")
    try:
        for k, tree in enumerate(args.trees):
            os.environ["PYTHONPATH"] = str(Path(tree).resolve() / "src")  # the daemons' code
            provider, pinfo, _ = start_daemon(work, f"provider{k}")
            fetcher, finfo, _ = start_daemon(work, f"fetcher{k}")
            pair = {
                "provider": provider,
                "fetcher": fetcher,
                "fetcher_info": finfo,
                "addr": pinfo["addrs"][0],
            }
            pairs.append(pair)
            with Client(pinfo["control"], timeout=600) as client:
                cid = client.content.add(str(blob))["cid"]
        rows: list[list[tuple[float, float, float]]] = [[] for _ in pairs]
        for r in range(args.gets):
            order = range(len(pairs)) if r % 2 == 0 else reversed(range(len(pairs)))
            for k in order:
                rows[k].append(one_get(pairs[k], cid, size))
        for k, tree in enumerate(args.trees):
            with Client(pairs[k]["fetcher_info"]["control"]) as client:
                serving = client.content.status().get("serving", {})
            both = [p + f for p, f, _ in rows[k]]
            emit(
                "content_cpu",
                tree,
                "get_cpu_ms_per_mib",
                both,
                provider=round(statistics.median(p for p, _, _ in rows[k]), 2),
                fetcher=round(statistics.median(f for _, f, _ in rows[k]), 2),
                mib_per_s=round(statistics.median(m for _, _, m in rows[k]), 1),
                size_mib=size // MIB,
                load=round(os.getloadavg()[0], 1),
                chunks_copied=serving.get("chunks_copied"),
                write_calls=serving.get("write_calls"),
            )
    finally:
        if env is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env
        for pair in pairs:
            stop(pair["provider"])
            stop(pair["fetcher"])
        shutil.rmtree(work, ignore_errors=True)


def pin(pid: int, cpu: int) -> None:
    """Every thread of process ``pid`` (worker threads are started later: pinned too, they inherit)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})


def four(args) -> None:
    from content import get

    size = parse_size(args.size, "--size")
    work, blob = random_blob("content-four-", size)
    providers: list = []
    fetcher = None
    try:
        providers = [start_daemon(work, f"p{i}") for i in range(4)]
        fetcher, finfo, _ = start_daemon(work, "fetcher")
        if args.pin:
            pin(fetcher.pid, 0)
            for proc, _, _ in providers:
                pin(proc.pid, 1)
        addrs = [info["addrs"][0] for _, info, _ in providers]
        for _, info, _ in providers:
            with Client(info["control"], timeout=600) as client:
                cid = client.content.add(str(blob))["cid"]
        rows: dict[str, list[tuple[float, float, float]]] = {"one": [], "four": []}
        for _ in range(args.runs):
            for name, named in (("one", addrs[:1]), ("four", addrs)):
                before = [cpu_s(p.pid) for p, _, _ in providers], cpu_s(fetcher.pid)
                done = get(finfo, cid, named, discover=len(named) > 1)
                with Client(finfo["control"]) as client:
                    client.content.gc()
                spent = sum(cpu_s(p.pid) for p, _, _ in providers) - sum(before[0])
                mib = size / MIB
                rows[name].append(
                    (mib / done["seconds"], spent / mib * 1e3, (cpu_s(fetcher.pid) - before[1]) / mib * 1e3)
                )
        for name, runs in rows.items():
            emit(
                "content_cpu",
                "lattice",
                f"{name}_provider{'s' if name == 'four' else ''}_mib_per_s",
                [r for r, _, _ in runs],
                providers_cpu_ms_per_mib=round(statistics.median(p for _, p, _ in runs), 2),
                fetcher_cpu_ms_per_mib=round(statistics.median(f for _, _, f in runs), 2),
                pinned=args.pin,
                size_mib=size // MIB,
                load=round(os.getloadavg()[0], 1),
            )
    finally:
        for proc, _, _ in providers:
            stop(proc)
        if fetcher is not None:
            stop(fetcher)
        shutil.rmtree(work, ignore_errors=True)


def disk(args) -> None:
    import numpy as np
    import trio

    from lattice.codec.buffers import aligned_empty
    from lattice.content.store import Store

    count = 256
    work = Path(tempfile.mkdtemp(prefix="content-disk-", dir=args.dir))
    try:
        src = work / "src"
        src.write_bytes(os.urandom(8 * MIB))
        store = Store(work / "store", 4 << 30)
        store.open()
        cid = store.add_file(src, MIB)
        raw = store.manifest_bytes(cid)
        data = np.fromfile(src, np.uint8)
        aligned = [aligned_empty(MIB) for _ in range(8)]
        unaligned = [np.empty(MIB + 64, np.uint8)[16 : 16 + MIB] for _ in range(8)]
        for bufs in (aligned, unaligned):
            for i, buf in enumerate(bufs):
                buf[:] = data[i * MIB : (i + 1) * MIB]

        def fresh():
            store.remove(cid)
            return store.begin(cid, raw)

        def writes(bufs) -> float:
            partial = fresh()
            start = time.process_time()
            for k in range(count):
                partial.write(k % 8, bufs[k % 8], verified=True)
            spent = time.process_time() - start
            store.release(partial)
            return spent / count * 1e3

        def hops(batch: int) -> float:
            partial = fresh()

            def store_some(items):
                return [partial.verify(i, b) and partial.write(i, b, verified=True) is None for i, b in items]

            async def main() -> float:
                limiter = trio.CapacityLimiter(2)
                items = [(k % 8, aligned[k % 8]) for k in range(count)]
                start = time.process_time()
                for k in range(0, count, batch):
                    await trio.to_thread.run_sync(store_some, items[k : k + batch], limiter=limiter)
                return time.process_time() - start

            spent = trio.run(main)
            store.release(partial)
            return spent / count * 1e3

        rows: dict[str, list[float]] = {
            "write_aligned": [],
            "write_bounce": [],
            "hop_per_chunk": [],
            "hop_per_4": [],
        }
        for _ in range(args.runs):
            rows["write_aligned"].append(writes(aligned))
            rows["write_bounce"].append(writes(unaligned))
            rows["hop_per_chunk"].append(hops(1))
            rows["hop_per_4"].append(hops(4))
        for name, values in rows.items():
            emit(
                "content_disk", "lattice", f"{name}_cpu_ms_per_mib", values, load=round(os.getloadavg()[0], 1)
            )
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trees", nargs="*", help="source trees to compare (each has src/lattice)")
    parser.add_argument("--gets", type=int, default=8)
    parser.add_argument("--size", default="256MiB")
    parser.add_argument("--disk", action="store_true", help="the fetcher's disk path alone (this tree)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--four", action="store_true", help="one provider against four (this tree)")
    parser.add_argument("--pin", action="store_true", help="--four: fetcher on CPU 0, providers on CPU 1")
    parser.add_argument("--dir", default=None, help="--disk: where to write (a file system with O_DIRECT)")
    args = parser.parse_args()
    if args.disk:
        disk(args)
    elif args.four:
        four(args)
    elif args.trees:
        trees(args)
    else:
        parser.error("name one or more trees, or --disk")


if __name__ == "__main__":
    main()
