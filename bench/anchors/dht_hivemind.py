"""hivemind DHT anchor for bench/dht: swarm node processes and the measuring driver.

Run with the hivemind venv's python, inside a network namespace holding only loopback (run_dht.py
does both). Roles:

    --role node --bootstrap ADDR|none [--count K]
        K hivemind `DHTNode`s (asyncio, one go-libp2p `p2pd` each) in this one process, on
        127.0.0.1. With `none` the first of them is the swarm's first node and the others bootstrap
        from it; otherwise all bootstrap from ADDR. Prints one JSON line per node:
        {"role": "node", "index": i, "maddr": ..., "pid": ..., "p2pd_pid": ..., "sockets": [...]}
        then {"role": "node", "ready": K}, and serves until stdin reaches EOF (or --lifetime).
        The runner kills a node by SIGKILLing its p2pd: all of a node's traffic goes through it.
    --role driver --bootstrap ADDR --ops N [--churn] [--nodes M]
        Client-mode DHTNodes that join the swarm (they serve no records): a writer stores N
        distinct keys (~100-byte values, expiring in 10 min), a reader that never held them gets
        each once (a node caches what it stored or fetched, so reads from the writer would be
        local). Each operation is timed alone. Prints
        {"role": "driver", "metric": "store_ms" | "get_ms", "samples": [...], "success": ...}.
        With --churn it then prints {"role": "driver", "event": "churn_ready"}, waits for a line
        on stdin (the runner kills nodes meanwhile), shuts its two nodes down, starts a fresh client
        node (no cache) and retries every key for up to --churn-window seconds, counted from the
        "go" line and including the join: {"role": "driver", "metric": "churn_retrievable", ...}.

``--host IP`` listens on IP instead of 127.0.0.1 (a WAN testbed host: bench/anchors/in_testbed.py).
``--part store`` runs the driver's writer only (it stores, prints store_ms, then waits for stdin
to reach EOF); ``--part get`` its reader only (it joins after the stores, gets, prints get_ms): the
two then live in different hosts.

JSON goes to the original stdout only; everything else the process writes to fd 1 lands on stderr.
hivemind keeps `bucket_size=20`, `num_replicas=5` and its other defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

HOST = "127.0.0.1"  # --host
P2P_KW: dict = {"nat_port_map": False, "auto_nat": False}  # no UPnP / NAT-PMP, no AutoNAT; + host_maddrs
VALUE_BYTES = 100
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


def stdin_closed_event(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    """An event set when stdin reaches EOF (the runner closed it or died) or delivers a line."""
    ev = asyncio.Event()

    def reader() -> None:
        try:
            sys.stdin.buffer.readline()
        except (OSError, ValueError):
            pass
        loop.call_soon_threadsafe(ev.set)

    threading.Thread(target=reader, daemon=True).start()
    return ev


def sockets_of(node) -> list[str]:
    """The unix control sockets hivemind made for this node's p2pd (left in /tmp if p2pd is SIGKILLed)."""
    p2p = node.protocol.p2p
    return [p2p._daemon_listen_maddr["unix"], p2p._client_listen_maddr["unix"]]


def value_for(key: str) -> bytes:
    return key.encode().ljust(VALUE_BYTES, b".")


async def run_nodes(args, emit) -> int:
    from hivemind.dht.node import DHTNode

    loop = asyncio.get_running_loop()
    stop = stdin_closed_event(loop)
    nodes = []
    boot = None if args.bootstrap == "none" else [args.bootstrap]
    try:
        for i in range(args.count):
            node = await DHTNode.create(initial_peers=boot, **P2P_KW)
            maddrs = [str(m) for m in await node.get_visible_maddrs()]
            maddr = next(m for m in maddrs if m.startswith(f"/ip4/{HOST}/tcp/"))
            if boot is None:
                boot = [maddr]
            nodes.append(node)
            p2p = node.protocol.p2p
            emit(
                {
                    "role": "node",
                    "index": i,
                    "maddr": maddr,
                    "pid": os.getpid(),
                    "p2pd_pid": p2p._child.pid,
                    "sockets": sockets_of(node),
                }
            )
        emit({"role": "node", "ready": len(nodes)})
        try:
            await asyncio.wait_for(stop.wait(), args.lifetime)
        except TimeoutError:
            pass
    finally:
        for node in nodes:
            try:
                await asyncio.wait_for(node.shutdown(), 5)
            except Exception:
                pass
        _common.kill_descendants(grace_s=2)
    return 0


async def wait_for_peers(nodes, want: int, deadline_s: float) -> list[int]:
    end = time.monotonic() + deadline_s
    while True:
        seen = [len(n.protocol.routing_table.uid_to_peer_id) for n in nodes]
        if min(seen) >= want or time.monotonic() > end:
            return seen
        await asyncio.sleep(0.05)


async def run_driver(args, emit) -> int:
    from hivemind.dht.node import DHTNode
    from hivemind.utils import get_dht_time

    loop = asyncio.get_running_loop()
    boot = [args.bootstrap]
    kw = dict(initial_peers=boot, client_mode=True, **P2P_KW)
    clients = []
    try:
        writer = reader = None
        for part in ("store", "get"):
            if args.part in (part, "both"):
                clients.append(await DHTNode.create(**kw))
                emit({"role": "driver", "event": "node", "sockets": sockets_of(clients[-1])})
                writer, reader = (clients[-1], reader) if part == "store" else (writer, clients[-1])
        want = min(args.nodes, 20)
        seen = await wait_for_peers(clients, want, args.peer_wait)
        emit({"role": "driver", "event": "joined", "peers_seen": seen, "peers_wanted": want})

        keys = [f"bench/{args.tag}/{i}" for i in range(args.ops)]
        store_ms, stored = [], 0
        for key in keys if writer is not None else ():
            t = time.perf_counter()
            ok = await writer.store(key, value_for(key), get_dht_time() + EXPIRATION_S)
            store_ms.append((time.perf_counter() - t) * 1000)
            stored += bool(ok)
        if writer is not None:
            emit({"role": "driver", "metric": "store_ms", "samples": store_ms, "success": stored / len(keys)})
        if reader is None:
            await stdin_closed_event(loop).wait()  # until the reader is done
            return 0

        get_ms, got = [], 0
        for key in keys:
            t = time.perf_counter()
            res = await reader.get(key)
            get_ms.append((time.perf_counter() - t) * 1000)
            got += res is not None and res.value == value_for(key)
        emit({"role": "driver", "metric": "get_ms", "samples": get_ms, "success": got / len(keys)})

        if args.churn:
            go = stdin_closed_event(loop)
            emit({"role": "driver", "event": "churn_ready"})
            await asyncio.wait_for(go.wait(), 120)
            t0 = time.monotonic()
            for c in clients:  # they cache what they stored or fetched; the fresh node below does not
                await c.shutdown()
            clients.clear()
            fresh = await DHTNode.create(**kw)
            clients.append(fresh)
            emit({"role": "driver", "event": "node", "sockets": sockets_of(fresh)})
            await wait_for_peers(clients, 1, args.churn_window)
            join_s = time.monotonic() - t0
            missing, rounds = list(keys), 0
            while missing and time.monotonic() - t0 < args.churn_window:
                rounds += 1
                still = []
                for key in missing:
                    if time.monotonic() - t0 >= args.churn_window:
                        still.append(key)
                        continue
                    res = await fresh.get(key)
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
        for c in clients:
            try:
                await asyncio.wait_for(c.shutdown(), 5)
            except Exception:
                pass
        _common.kill_descendants(grace_s=2)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=("node", "driver"), required=True)
    ap.add_argument("--bootstrap", required=True, help="multiaddr of the first node, or 'none'")
    ap.add_argument("--count", type=int, default=1, help="node role: DHTNodes in this process")
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
    P2P_KW["host_maddrs"] = [f"/ip4/{HOST}/tcp/0"]
    emit = json_out()
    role = run_nodes if args.role == "node" else run_driver
    return asyncio.run(role(args, emit))


if __name__ == "__main__":
    sys.exit(main())
