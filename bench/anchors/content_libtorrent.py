"""bench/anchors/content_libtorrent.py: a local libtorrent swarm sharing one file (bench/content.py).

    python bench/anchors/content_libtorrent.py --file BLOB --seeders N [--runs R] [--dir DIR]

N seeders (each its own process, seed mode: no re-check) and one leecher (its own process) on
127.0.0.1; the leecher is told every seeder's port (no tracker, DHT, LSD, UPnP or NAT-PMP) and
downloads the file into a fresh directory, checking every piece (SHA-1, libtorrent's default v1+v2
hybrid torrent hashes SHA-256 blocks too). One JSON line per run: {"seconds", "mib_per_s"}; or
{"error"} if libtorrent is not installed (`pip install libtorrent`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

SETTINGS = {
    "enable_dht": False,
    "enable_lsd": False,
    "enable_upnp": False,
    "enable_natpmp": False,
    "allow_multiple_connections_per_ip": True,  # every seeder is 127.0.0.1
    "alert_mask": 0,
}


def _session(port: int):
    """libtorrent's own preset for fast seeding (`high_performance_seed`: larger send buffers, more
    unchoke slots, ...), TCP only (uTP's delay-based congestion control crawls on loopback: 9 MiB/s
    from one seeder in a trial), no discovery."""
    import libtorrent as lt

    settings = {**lt.high_performance_seed(), **SETTINGS, "listen_interfaces": f"127.0.0.1:{port}"}
    settings.update(enable_outgoing_utp=False, enable_incoming_utp=False)
    return lt.session(settings)


def make_torrent(path: Path, out: Path, piece: int = 1 << 20) -> None:
    """A torrent of one file, 1 MiB pieces (our chunk size)."""
    import libtorrent as lt

    fs = lt.file_storage()
    lt.add_files(fs, str(path))
    t = lt.create_torrent(fs, piece)
    lt.set_piece_hashes(t, str(path.parent))
    out.write_bytes(lt.bencode(t.generate()))


def seed(torrent: Path, data_dir: Path, port: int) -> None:
    """Seed until killed (prints "ready" once listening)."""
    import libtorrent as lt

    ses = _session(port)
    ses.add_torrent(
        {"ti": lt.torrent_info(str(torrent)), "save_path": str(data_dir), "flags": lt.torrent_flags.seed_mode}
    )
    print("ready", ses.listen_port(), flush=True)
    while True:
        time.sleep(3600)


def leech(torrent: Path, save: Path, ports: list[int]) -> float:
    """Download into ``save``; returns the seconds from adding the torrent to the last piece."""
    import libtorrent as lt

    ses = _session(0)
    info = lt.torrent_info(str(torrent))
    start = time.perf_counter()
    handle = ses.add_torrent({"ti": info, "save_path": str(save)})
    for port in ports:
        handle.connect_peer(("127.0.0.1", port))
    while not handle.status().is_seeding:
        time.sleep(0.01)
        if time.perf_counter() - start > 600:
            raise TimeoutError("libtorrent download did not finish in 600 s")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--file", required=True, type=Path)
    parser.add_argument("--seeders", type=int, default=1)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument(
        "--role", choices=["driver", "seed", "leech"], default="driver", help=argparse.SUPPRESS
    )
    parser.add_argument("--torrent", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--ports", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore", DeprecationWarning)  # libtorrent 2.1 deprecates its 2.0 API
    try:
        import libtorrent  # noqa: F401
    except ImportError as exc:
        print(json.dumps({"error": f"libtorrent not installed ({exc})"}), flush=True)
        return
    if args.role == "seed":
        seed(args.torrent, args.file.parent, args.port)
        return
    if args.role == "leech":
        seconds = leech(args.torrent, args.dir, [int(p) for p in args.ports.split(",")])
        print(json.dumps({"seconds": seconds}), flush=True)
        return
    work = args.dir or Path(f"/tmp/lattice-libtorrent-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    torrent = work / "blob.torrent"
    make_torrent(args.file.resolve(), torrent)
    me = [sys.executable, __file__, "--file", str(args.file.resolve()), "--torrent", str(torrent)]
    seeders = []
    try:
        ports = []
        for _ in range(args.seeders):
            proc = subprocess.Popen([*me, "--role", "seed"], stdout=subprocess.PIPE, text=True)
            seeders.append(proc)
            line = proc.stdout.readline().split()
            ports.append(int(line[1]))
        size = args.file.stat().st_size
        for run in range(args.runs):
            save = work / f"leech{run}"
            save.mkdir(exist_ok=True)
            out = subprocess.run(
                [*me, "--role", "leech", "--dir", str(save), "--ports", ",".join(map(str, ports))],
                capture_output=True,
                text=True,
                timeout=900,
            )
            if out.returncode != 0:
                print(json.dumps({"error": out.stderr.strip().splitlines()[-1:]}), flush=True)
                continue
            seconds = json.loads(out.stdout)["seconds"]
            ok = (save / args.file.name).stat().st_size == size
            print(
                json.dumps({"seconds": seconds, "mib_per_s": size / 2**20 / seconds, "complete": ok}),
                flush=True,
            )
            shutil.rmtree(save, ignore_errors=True)
    finally:
        for proc in seeders:
            proc.kill()
            proc.wait()
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
