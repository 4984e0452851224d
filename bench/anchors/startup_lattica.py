"""Start ONE Lattica node on 127.0.0.1, report readiness and idle memory, exit.

Run with the Lattica venv's python, inside a network namespace that holds only loopback
(Lattica probes public STUN servers at start-up and that cannot be switched off):

    unshare -n sh -c 'ip link set lo up; exec $VENV/bin/python bench/anchors/startup_lattica.py'

Prints exactly one JSON line on stdout:
    {"system": "lattica", "ready_s": ..., "rss_mib": ..., "pss_mib": ..., "procs": ..., ...}
"ready" = node built with listen, mDNS, UPnP, AutoNAT and DCUtR set for loopback only, one RPC service
registered, and its TCP listener answering a libp2p multistream-select + security negotiation.
ready_s is measured from process creation (/proc, 10 ms resolution); a driver that passes a pipe fd
in ANCHOR_READY_FD gets one byte on it at that moment and measures wall time itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="key + storage dir (kept: a restart with an existing key)")
    ap.add_argument("--idle", type=float, default=2.0, help="seconds idle before reading memory")
    args = ap.parse_args()

    tmp = None
    if args.data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lattica-anchor-")
        args.data_dir = tmp.name
    os.makedirs(args.data_dir, exist_ok=True)

    from lattica import ConnectionHandler, Lattica, rpc_method

    class Echo(ConnectionHandler):
        @rpc_method
        def ping(self, x: int) -> int:
            return x

    port = _common.free_tcp_port()
    addr = f"/ip4/127.0.0.1/tcp/{port}"
    node = (
        Lattica.builder()
        .with_listen_addrs([addr])
        .with_external_addrs([addr])
        .with_mdns(False)
        .with_upnp(False)
        .with_autonat(False)
        .with_dcutr(False)
        .with_key_path(os.path.join(args.data_dir, "key"))
        .with_storage_path(os.path.join(args.data_dir, "storage"))
        .with_dht_db_path(os.path.join(args.data_dir, "dht"))
        .build()
    )
    Echo(node)
    answer = _common.wait_probe(port)
    ready_s = _common.seconds_since_process_start()
    _common.signal_ready()

    time.sleep(args.idle)
    rss, pss, procs = _common.tree_memory_mib()
    peer_id = node.peer_id()

    t = time.perf_counter()
    node.close()
    _common.kill_descendants()
    close_s = time.perf_counter() - t
    _common.emit(
        {
            "system": "lattica",
            "ready_s": round(ready_s, 4),
            "rss_mib": round(rss, 2),
            "pss_mib": round(pss, 2),
            "procs": procs,
            "close_s": round(close_s, 4),
            "security_answer": answer,
            "maddr": f"{addr}/p2p/{peer_id}",
        }
    )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
