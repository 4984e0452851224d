"""Lattica DHT anchor for bench/dht: one swarm node per process, or the measuring driver.

Run with the Lattica venv's python, inside a network namespace holding only loopback (run_dht.py
does both; Lattica queries public STUN servers at every start). Roles:

    --role node --bootstrap ADDR|none --data-dir D
        One Lattica node on 127.0.0.1 (mDNS, UPnP, AutoNAT, DCUtR off). Prints
        {"role": "node", "index": 0, "maddr": ..., "pid": ..., "peers": ...} once its listener answers a
        libp2p negotiation and (with a bootstrap) it is connected to a peer, then
        {"role": "node", "ready": 1}, and serves until stdin reaches EOF (or --lifetime).
        The runner kills a node by SIGKILLing this process.
    --role driver --bootstrap ADDR --ops N --data-dir D [--churn] [--nodes M]
        Two nodes of its own join the swarm (Lattica has no client-only mode: every node serves
        Kademlia records, so these are members too): a writer stores N distinct keys (~100-byte
        values, expiring in 10 min), a reader gets each once. Each operation is timed alone.
        Prints {"role": "driver", "metric": "store_ms" | "get_ms", "samples": [...], "success": ...}.
        With --churn it then prints {"role": "driver", "event": "churn_ready"}, waits for a line on
        stdin (the runner kills nodes meanwhile), closes its own two nodes, starts a fresh node (it
        holds none of the records) and retries every key for up to --churn-window seconds, counted
        from the "go" line and including the join: {"role": "driver", "metric": "churn_retrievable", ...}.

``--host IP`` listens on IP instead of 127.0.0.1 (a WAN testbed host: bench/anchors/in_testbed.py).
``--part store`` runs the driver's writer only (it stores, prints store_ms, then serves until stdin
reaches EOF: it stays a member of the swarm); ``--part get`` its reader only (it joins after the
stores, gets, prints get_ms): the two then live in different hosts.

JSON goes to the original stdout only; everything else written to fd 1 (Lattica prints its store
and get errors there) lands on stderr. Lattica's Kademlia keeps its defaults (rust-libp2p: k = 20,
records on the 20 closest nodes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

VALUE_BYTES = 100
HOST = "127.0.0.1"  # --host
EXPIRATION_S = 600.0


def json_out():
    """Keep the real stdout for our JSON lines; point fd 1 at stderr for whatever else prints."""
    fd = os.dup(1)
    os.dup2(2, 1)
    stream = os.fdopen(fd, "w", buffering=1)

    def emit(line: dict) -> None:
        stream.write(json.dumps(line) + "\n")
        stream.flush()

    return emit


def stdin_event() -> threading.Event:
    """An event set when stdin delivers a line or reaches EOF (the runner closed it or died)."""
    ev = threading.Event()

    def reader() -> None:
        try:
            sys.stdin.buffer.readline()
        except (OSError, ValueError):
            pass
        ev.set()

    threading.Thread(target=reader, daemon=True).start()
    return ev


def build(data_dir: str, bootstrap: str | None):
    from lattica import Lattica

    port = _common.free_tcp_port(HOST)  # Lattica cannot report a port it chose: pick it first
    addr = f"/ip4/{HOST}/tcp/{port}"
    b = (
        Lattica.builder()
        .with_listen_addrs([addr])
        .with_external_addrs([addr])
        .with_mdns(False)
        .with_upnp(False)
        .with_autonat(False)
        .with_dcutr(False)
        .with_key_path(os.path.join(data_dir, "key"))
        .with_storage_path(os.path.join(data_dir, "storage"))
        .with_dht_db_path(os.path.join(data_dir, "dht"))
    )
    if bootstrap:
        b = b.with_bootstraps([bootstrap])
    node = b.build()
    _common.wait_probe(port, host=HOST)
    return node, f"{addr}/p2p/{node.peer_id()}"


def wait_for_peers(nodes, want: int, deadline_s: float) -> list[int]:
    end = time.monotonic() + deadline_s
    while True:
        seen = [len(n.get_all_peers()) for n in nodes]
        if min(seen) >= want or time.monotonic() > end:
            return seen
        time.sleep(0.01)


def value_for(key: str) -> bytes:
    return key.encode().ljust(VALUE_BYTES, b".")


def run_node(args, emit) -> int:
    stop = stdin_event()
    boot = None if args.bootstrap == "none" else args.bootstrap
    node, maddr = build(args.data_dir, boot)
    try:
        peers = wait_for_peers([node], 1, 10.0)[0] if boot else 0
        emit({"role": "node", "index": 0, "maddr": maddr, "pid": os.getpid(), "peers": peers})
        emit({"role": "node", "ready": 1})
        stop.wait(args.lifetime)
    finally:
        node.close()
    return 0


def run_driver(args, emit) -> int:
    nodes = []
    try:
        writer = reader = None
        if args.part in ("store", "both"):
            writer, _ = build(os.path.join(args.data_dir, "w"), args.bootstrap)
            nodes.append(writer)
        if args.part in ("get", "both"):
            reader, _ = build(os.path.join(args.data_dir, "r"), args.bootstrap)
            nodes.append(reader)
        want = min(args.nodes, 20)
        seen = wait_for_peers(nodes, want, args.peer_wait)
        emit({"role": "driver", "event": "joined", "peers_seen": seen, "peers_wanted": want})

        keys = [f"bench/{args.tag}/{i}" for i in range(args.ops)]
        store_ms, stored = [], 0
        for key in keys if writer is not None else ():
            t = time.perf_counter()
            ok = writer.store(key, value_for(key), time.time() + EXPIRATION_S)
            store_ms.append((time.perf_counter() - t) * 1000)
            stored += bool(ok)
        if writer is not None:
            emit({"role": "driver", "metric": "store_ms", "samples": store_ms, "success": stored / len(keys)})
        if reader is None:
            stdin_event().wait(args.lifetime)  # the writer stays a member while the reader gets
            return 0

        get_ms, got = [], 0
        for key in keys:
            t = time.perf_counter()
            res = reader.get(key)
            get_ms.append((time.perf_counter() - t) * 1000)
            got += res is not None and res.value == value_for(key)
        emit({"role": "driver", "metric": "get_ms", "samples": get_ms, "success": got / len(keys)})

        if args.churn:
            go = stdin_event()
            emit({"role": "driver", "event": "churn_ready"})
            if not go.wait(120):
                raise RuntimeError("no churn go-ahead within 120 s")
            t0 = time.monotonic()
            for n in nodes:  # they hold replicas; the fresh node below must find the records elsewhere
                n.close()
            nodes.clear()
            fresh, _ = build(os.path.join(args.data_dir, "c"), args.bootstrap)
            nodes.append(fresh)
            wait_for_peers(nodes, 1, args.churn_window)
            join_s = time.monotonic() - t0
            missing, rounds = list(keys), 0
            while missing and time.monotonic() - t0 < args.churn_window:
                rounds += 1
                still = []
                for key in missing:
                    if time.monotonic() - t0 >= args.churn_window:
                        still.append(key)
                        continue
                    res = fresh.get(key)
                    if res is None or res.value != value_for(key):
                        still.append(key)
                missing = still
            emit(
                {
                    "role": "driver",
                    "metric": "churn_retrievable",
                    "value": 1 - len(missing) / len(keys),
                    "seconds": round(time.monotonic() - t0, 3),
                    "join_s": round(join_s, 3),
                    "rounds": rounds,
                }
            )
    finally:
        for n in nodes:
            n.close()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=("node", "driver"), required=True)
    ap.add_argument("--bootstrap", required=True, help="multiaddr of the first node, or 'none'")
    ap.add_argument("--data-dir", required=True, help="key + storage dir of this process (created)")
    ap.add_argument("--count", type=int, default=1, help="node role: only 1 is supported")
    ap.add_argument("--lifetime", type=float, default=1800.0, help="node role: exit after this many s")
    ap.add_argument("--ops", type=int, default=300)
    ap.add_argument("--nodes", type=int, default=32, help="driver: swarm size (peers to wait for)")
    ap.add_argument("--peer-wait", type=float, default=30.0, help="driver: max s to wait for peers")
    ap.add_argument("--churn", action="store_true")
    ap.add_argument("--churn-window", type=float, default=30.0)
    ap.add_argument("--tag", default="0", help="driver: key prefix, distinct per run")
    ap.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    ap.add_argument("--part", choices=("both", "store", "get"), default="both", help="driver: writer, reader")
    args = ap.parse_args()
    global HOST
    HOST = args.host
    if args.count != 1:
        ap.error("Lattica nodes run one per process (--count 1)")
    os.makedirs(args.data_dir, exist_ok=True)
    emit = json_out()
    return run_node(args, emit) if args.role == "node" else run_driver(args, emit)


if __name__ == "__main__":
    sys.exit(main())
