"""A local swarm in one command: N `lattice-node` daemons on 127.0.0.1, then each service in use.

    python examples/local_swarm.py --nodes 4 [--keep]

Starts a testnet (`lattice.swarm.testnet.Testnet`, the same as `lattice-node testnet`: real daemon
processes around one bootstrap node), waits until every node knows the others through the DHT, then
drives the daemons from this process with `lattice.Client`: ping, a DHT record written on one node
and read on another, a replicated CRDT document, and a numpy tensor sent over the RPC and back.
`--keep` leaves the swarm running (with its web pages) until Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from lattice import Client
from lattice.swarm.testnet import Testnet


def wait_for(check, timeout: float = 10.0, step: float = 0.05):
    """Poll ``check()`` until it returns a truthy value (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=4, help="number of daemons (default 4)")
    parser.add_argument("--keep", action="store_true", help="keep running until Ctrl-C")
    args = parser.parse_args()
    if not 2 <= args.nodes <= 64:
        parser.error("--nodes must be between 2 and 64")
    workdir = Path(tempfile.mkdtemp(prefix="lattice-swarm-"))
    t0 = time.monotonic()
    with Testnet(workdir, args.nodes, extra_args=["--enable-bench"]) as net:
        ready = time.monotonic() - t0
        dht_s = net.wait_dht(timeout=30)
        print(f"{args.nodes} daemons ready in {ready:.2f} s, DHT complete after {dht_s:.2f} s more")
        first, last = net.nodes[1 % args.nodes].info, net.nodes[-1].info
        boot = net.nodes[0].info
        with Client(first["control"]) as a, Client(last["control"]) as b:
            rtts = a.ping(boot["peer_id"], count=5)
            print(
                f"ping {first['peer_id'][:16]}... -> bootstrap: median {statistics.median(rtts) * 1e3:.3f} ms"
            )

            stored = a.dht.put("demo/greeting", "hello swarm", ttl=600)
            got = b.dht.get("demo/greeting")[0]["value"]
            text = got.decode() if isinstance(got, bytes) else got
            print(f"DHT: put on node1 stored on {stored} peers; node{args.nodes - 1} reads {text!r}")

            a.call("crdt.set", doc="demo/config", key="lr", value=0.05)
            value = wait_for(lambda: b.call("crdt.get", doc="demo/config").get("lr"))
            print(f"CRDT: lr=0.05 set on node1, node{args.nodes - 1} sees lr={value}")

            x = np.arange(1 << 20, dtype=np.float32)  # 4 MiB
            start = time.perf_counter()
            y = a.rpc.call(last["peer_id"], "lattice.bench.echo", x)
            ms = (time.perf_counter() - start) * 1e3
            print(
                f"RPC: 4 MiB float32 tensor to node{args.nodes - 1} and back in {ms:.1f} ms,"
                f" equal: {np.array_equal(x, y)}"
            )
        pages = [n.info.get("http") for n in net.nodes if n.info.get("http")]
        if pages:
            print(f"web page of the bootstrap node: {pages[0]}")
        if args.keep:
            print("control sockets:")
            for node in net.nodes:
                print(f"  lattice-node status --control {node.info['control']}")
            print("Ctrl-C to stop")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    print("all daemons stopped")


if __name__ == "__main__":
    main()
