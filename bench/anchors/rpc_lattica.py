"""RPC figures of Lattica between two processes on 127.0.0.1 (server role, client role).

Run with the Lattica venv's python, both roles inside ONE network namespace that holds only loopback
(bench/anchors/run_rpc.py does this; Lattica probes public STUN servers at start-up otherwise):

    python rpc_lattica.py --role server                       # prints "ADDR /ip4/127.0.0.1/tcp/P/p2p/ID"
    python rpc_lattica.py --role client --server ADDR [--runs 5]

``--host IP`` listens on IP instead of 127.0.0.1 (a WAN testbed host: bench/anchors/in_testbed.py);
``--metrics a,b`` measures only those figures (and warms up only their paths).

The server serves until its stdin closes (or --max-seconds). The client connects, warms up, measures
and prints one JSON line per figure:
    {"bench": "rpc", "system": "lattica", "metric": ..., "median": ..., "runs": [...], "path": ...}
or {"bench": "rpc", "system": "lattica", "metric": ..., "error": ...}.

Paths: small round trip = `@rpc_method` (unary, request/response protocol); large payloads =
`@rpc_stream` (one call moves the whole payload over Lattica's `/rpc/stream/1.0.0`; its own example
sends 1 GiB this way). Lattica has no tensor type: payloads are random `bytes` (pickled by Lattica,
as any argument or reply is). `down_64mib_iter_mibs` is the alternative download path,
`@rpc_stream_iter` yielding 1 MiB chunks that the client joins.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

MIB = 1 << 20
SYSTEM = "lattica"
CALL_TIMEOUT_S = 120  # seconds; the core wants an int (--call-timeout)

# random payloads, made once per process so that generating them is never timed
_PAYLOADS: dict[int, bytes] = {}


def payload(n: int) -> bytes:
    if n not in _PAYLOADS:
        _PAYLOADS[n] = os.urandom(n)
    return _PAYLOADS[n]


def make_service_class():
    from lattica import ConnectionHandler, rpc_method, rpc_stream, rpc_stream_iter

    class RpcBench(ConnectionHandler):  # service name = class name; the same class on both sides
        @rpc_method
        def echo(self, x: bytes) -> bytes:
            return x

        @rpc_stream
        def sink(self, data: bytes) -> int:
            return len(data)

        @rpc_stream
        def source(self, n: int) -> bytes:
            return payload(n)

        @rpc_stream_iter
        def source_iter(self, n: int):
            data = payload(n)
            for off in range(0, n, MIB):
                yield data[off : off + MIB]

    return RpcBench


def build_node(data_dir: str, port: int, bootstraps: list[str] | None = None, host: str = "127.0.0.1"):
    from lattica import Lattica

    addr = f"/ip4/{host}/tcp/{port}"
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
    if bootstraps:
        b = b.with_bootstraps(bootstraps)
    return b.build(), addr


def serve(data_dir: str, max_seconds: float, host: str) -> int:
    svc_cls = make_service_class()
    port = _common.free_tcp_port(host)
    node, addr = build_node(data_dir, port, host=host)
    svc_cls(node)
    _common.wait_probe(port, host=host)
    for size in (MIB, 64 * MIB):
        payload(size)
    print(f"ADDR {addr}/p2p/{node.peer_id()}", flush=True)
    # handlers run on Lattica's threads; wait here (GIL released) until the driver closes stdin
    end = time.monotonic() + max_seconds
    while time.monotonic() < end:
        ready, _, _ = select.select([sys.stdin], [], [], min(1.0, max(0.0, end - time.monotonic())))
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break
    node.close()
    _common.kill_descendants()
    return 0


def line(metric: str, runs: list[float], path: str, **extra) -> None:
    _common.emit(
        {
            "bench": "rpc",
            "system": SYSTEM,
            "metric": metric,
            "median": round(statistics.median(runs), 4),
            "runs": [round(x, 4) for x in runs],
            "path": path,
            **extra,
        }
    )


def error(metric: str, exc: BaseException) -> None:
    msg = f"{type(exc).__name__}: {exc}"
    _common.emit({"bench": "rpc", "system": SYSTEM, "metric": metric, "error": msg[-600:]})


def client(server: str, data_dir: str, runs: int, rtt_calls: int, host: str, metrics: set[str] | None) -> int:
    """Measure the figures in ``metrics`` (None: all) against ``server``."""
    svc_cls = make_service_class()
    server_id = server.rsplit("/p2p/", 1)[1]
    node, _ = build_node(data_dir, _common.free_tcp_port(host), [server], host)

    def want(metric: str) -> bool:
        return metrics is None or metric in metrics

    svc = svc_cls(node)
    # the first call right after build() fails once inside the core and is retried ~100 ms later:
    # wait until the bootstrap connection is up (bounded)
    end = time.monotonic() + 30
    while server_id not in node.get_all_peers():
        if time.monotonic() > end:
            error("connect", TimeoutError(f"server {server_id} not among peers after 30 s"))
            node.close()
            return 1
        time.sleep(0.002)
    stub = svc.get_stub(server_id)

    # warm-up: unary, then each large path: 5 calls at 1 MiB, 1 at 64 MiB
    small = b"ping1234"
    for _ in range(50):
        stub.echo(small).result(timeout=CALL_TIMEOUT_S)
    for size, calls, label in ((MIB, 5, "1mib"), (64 * MIB, 1, "64mib")):
        data = payload(size)
        try:
            for _ in range(calls):
                if want(f"up_{label}_mibs"):
                    stub.sink(data).result(timeout=CALL_TIMEOUT_S)
                if want(f"down_{label}_mibs"):
                    stub.source(size).result(timeout=CALL_TIMEOUT_S)
        except Exception:
            pass  # reported by the measured calls below

    try:
        batches = []
        for _ in range(runs if want("rtt_ms") else 0):
            samples = []
            for _ in range(rtt_calls):
                t = time.perf_counter()
                r = stub.echo(small).result(timeout=CALL_TIMEOUT_S)
                samples.append((time.perf_counter() - t) * 1000)
                if r != small:
                    raise RuntimeError(f"echo returned {r!r}")
            batches.append(statistics.median(samples))
        if batches:
            line("rtt_ms", batches, "rpc_method (unary)", calls_per_run=rtt_calls, payload_bytes=len(small))
    except Exception as e:
        error("rtt_ms", e)

    for size, label in ((64 * MIB, "64mib"), (MIB, "1mib")):
        count = runs if size > MIB else max(runs, 20)
        data = payload(size)
        try:
            speeds = []
            for _ in range(count if want(f"up_{label}_mibs") else 0):
                t = time.perf_counter()
                got = stub.sink(data).result(timeout=CALL_TIMEOUT_S)
                speeds.append(size / MIB / (time.perf_counter() - t))
                if got != size:
                    raise RuntimeError(f"sink returned {got!r}, expected {size}")
            if speeds:
                line(f"up_{label}_mibs", speeds, "rpc_stream (bytes)")
        except Exception as e:
            error(f"up_{label}_mibs", e)
        try:
            speeds = []
            for _ in range(count if want(f"down_{label}_mibs") else 0):
                t = time.perf_counter()
                got = stub.source(size).result(timeout=CALL_TIMEOUT_S)
                speeds.append(size / MIB / (time.perf_counter() - t))
                if len(got) != size:
                    raise RuntimeError(f"source returned {len(got)} bytes, expected {size}")
            if speeds:
                line(f"down_{label}_mibs", speeds, "rpc_stream (bytes)")
        except Exception as e:
            error(f"down_{label}_mibs", e)

    size = 64 * MIB
    try:
        speeds = []
        for _ in range(
            runs + 1 if want("down_64mib_iter_mibs") else 0
        ):  # the first one is a warm-up for this path
            t = time.perf_counter()
            got = b"".join(stub.source_iter(size))
            speeds.append(size / MIB / (time.perf_counter() - t))
            if len(got) != size:
                raise RuntimeError(f"source_iter returned {len(got)} bytes, expected {size}")
        if speeds:
            line("down_64mib_iter_mibs", speeds[1:], "rpc_stream_iter (64 x 1 MiB bytes, joined)")
    except Exception as e:
        error("down_64mib_iter_mibs", e)

    node.close()
    _common.kill_descendants()
    return 0


def main() -> int:
    global CALL_TIMEOUT_S
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=("server", "client"), required=True)
    ap.add_argument("--server", help="client: the server's ADDR line (/ip4/.../tcp/P/p2p/ID)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rtt-calls", type=int, default=400, help="unary calls per run (median per run)")
    ap.add_argument("--max-seconds", type=float, default=900, help="server: serve at most this long")
    ap.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    ap.add_argument("--metrics", default="", help="client: only these figures (comma-separated)")
    ap.add_argument("--call-timeout", type=int, default=CALL_TIMEOUT_S, help="seconds per call")
    args = ap.parse_args()
    CALL_TIMEOUT_S = args.call_timeout
    metrics = {m for m in args.metrics.split(",") if m} or None
    if args.role == "client" and not args.server:
        ap.error("--role client needs --server ADDR")
    with tempfile.TemporaryDirectory(prefix=f"lattica-rpc-{args.role}-") as data_dir:
        if args.role == "server":
            return serve(data_dir, args.max_seconds, args.host)
        return client(args.server, data_dir, max(1, args.runs), max(1, args.rtt_calls), args.host, metrics)


if __name__ == "__main__":
    sys.exit(main())
