"""RPC figures of hivemind between two processes on 127.0.0.1 (server role, client role).

Run with the hivemind venv's python, both roles inside ONE network namespace that holds only loopback
(bench/anchors/run_rpc.py does this):

    python rpc_hivemind.py --role server                       # prints "ADDR /ip4/127.0.0.1/tcp/P/p2p/ID"
    python rpc_hivemind.py --role client --server ADDR [--runs 5]

``--host IP`` listens on IP instead of 127.0.0.1 (a WAN testbed host: bench/anchors/in_testbed.py);
``--metrics a,b`` measures only those figures (and warms up only their paths).

Each role is one `hivemind.p2p.P2P` (one Python process + its go-libp2p daemon p2pd). The server serves
until its stdin closes (or --max-seconds). The client connects, warms up, measures and prints one JSON
line per figure:
    {"bench": "rpc", "system": "hivemind", "metric": ..., "median": ..., "runs": [...], "path": ...}
or {"bench": "rpc", "system": "hivemind", "metric": ..., "error": ...}.

Paths, as hivemind's own MoE client/server (`hivemind.moe.client.expert.expert_forward`,
`hivemind.moe.server.connection_handler`) move tensors: float32 torch tensors through
`serialize_torch_tensor` (NONE compression) in `runtime_pb2.ExpertRequest/ExpertResponse`; payloads up
to MAX_UNARY_PAYLOAD_SIZE (2 MiB) in one unary protobuf call (the daemon's persistent connection,
4 MiB message cap), larger ones split by `split_for_streaming(..., DEFAULT_MAX_MSG_SIZE)` into 4 MiB
parts over a protobuf stream and rebuilt with `deserialize_tensor_stream`. Small round trip = unary
`test_pb2.TestRequest` -> `TestResponse` (a 2-byte message). Also `*_raw_mibs`: the same payload size as
raw bytes over a binary stream (`add_binary_stream_handler` / `call_binary_stream_handler`,
`P2P.send_raw_data` / `receive_raw_data`: 8-byte length + bytes; a new stream per call).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from typing import AsyncIterator  # noqa: UP035  hivemind finds stream handlers by typing's alias

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common
import torch
from hivemind.compression import deserialize_tensor_stream, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.p2p.p2p_daemon_bindings.control import DEFAULT_MAX_MSG_SIZE, MAX_UNARY_PAYLOAD_SIZE
from hivemind.proto import runtime_pb2, test_pb2
from hivemind.utils.asyncio import amap_in_executor, iter_as_aiter
from hivemind.utils.streaming import split_for_streaming

MIB = 1 << 20
SYSTEM = "hivemind"
CALL_TIMEOUT_S = 120.0
RAW_HANDLER_UP = "RpcBench.raw_sink"
RAW_HANDLER_DOWN = "RpcBench.raw_source"

P2P_KW = dict(nat_port_map=False, auto_nat=False)


def listen(host: str) -> dict:
    """P2P.create arguments: listen on ``host`` only, no UPnP / NAT-PMP, no AutoNAT."""
    return dict(host_maddrs=[f"/ip4/{host}/tcp/0"], **P2P_KW)


_TENSORS: dict[int, torch.Tensor] = {}
_BYTES: dict[int, bytes] = {}


def tensor(nbytes: int) -> torch.Tensor:
    """A random float32 tensor of nbytes, made once per process (generating it is never timed)."""
    if nbytes not in _TENSORS:
        _TENSORS[nbytes] = torch.randn(nbytes // 4, dtype=torch.float32)
    return _TENSORS[nbytes]


def raw(nbytes: int) -> bytes:
    if nbytes not in _BYTES:
        _BYTES[nbytes] = os.urandom(nbytes)
    return _BYTES[nbytes]


class RpcBench(ServicerBase):  # handler names "RpcBench.rpc_*"; types come from the annotations
    async def rpc_echo(self, req: test_pb2.TestRequest, ctx: P2PContext) -> test_pb2.TestResponse:
        return test_pb2.TestResponse(number=req.number)

    async def rpc_sink(self, req: runtime_pb2.ExpertRequest, ctx: P2PContext) -> runtime_pb2.ExpertResponse:
        (t,) = [deserialize_torch_tensor(x) for x in req.tensors]
        return runtime_pb2.ExpertResponse(metadata=str(t.numel() * t.element_size()).encode())

    async def rpc_sink_stream(
        self, reqs: AsyncIterator[runtime_pb2.ExpertRequest], ctx: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        async def parts():
            async for r in reqs:
                yield r.tensors

        (t,) = await deserialize_tensor_stream(parts())
        return runtime_pb2.ExpertResponse(metadata=str(t.numel() * t.element_size()).encode())

    async def rpc_source(self, req: test_pb2.TestRequest, ctx: P2PContext) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(tensors=[serialize_torch_tensor(tensor(req.number))])

    async def rpc_source_stream(
        self, req: test_pb2.TestRequest, ctx: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        # as hivemind's ConnectionHandler.rpc_forward_stream: split the serialized output, then yield
        parts = list(split_for_streaming(serialize_torch_tensor(tensor(req.number)), DEFAULT_MAX_MSG_SIZE))
        for part in parts:
            yield runtime_pb2.ExpertResponse(tensors=[part])


async def raw_sink_handler(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        data = await P2P.receive_raw_data(reader)
        await P2P.send_raw_data(len(data).to_bytes(8, "big"), writer)
    finally:
        writer.close()


async def raw_source_handler(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        n = int.from_bytes(await P2P.receive_raw_data(reader), "big")
        await P2P.send_raw_data(raw(n), writer)
    finally:
        writer.close()


async def serve(max_seconds: float, host: str) -> int:
    for size in (MIB, 64 * MIB):
        tensor(size)
        raw(size)
    p2p = await P2P.create(**listen(host))
    await RpcBench().add_p2p_handlers(p2p)
    await p2p.add_binary_stream_handler(RAW_HANDLER_UP, raw_sink_handler)
    await p2p.add_binary_stream_handler(RAW_HANDLER_DOWN, raw_source_handler)
    maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
    addr = next(m for m in maddrs if m.startswith(f"/ip4/{host}/tcp/"))
    print(f"ADDR {addr}", flush=True)

    loop = asyncio.get_running_loop()
    stdin_closed = asyncio.Event()

    def on_stdin() -> None:
        if not os.read(sys.stdin.fileno(), 4096):
            loop.remove_reader(sys.stdin.fileno())
            stdin_closed.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    try:
        await asyncio.wait_for(stdin_closed.wait(), max_seconds)
    except TimeoutError:
        pass
    await p2p.shutdown()
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


async def upload(stub, t: torch.Tensor) -> int:
    """One tensor client -> server the way hivemind's expert_forward sends its inputs."""
    serialized = serialize_torch_tensor(t)
    if t.numel() * t.element_size() > MAX_UNARY_PAYLOAD_SIZE:
        split = split_for_streaming(serialized, DEFAULT_MAX_MSG_SIZE)
        reqs = amap_in_executor(
            lambda part: runtime_pb2.ExpertRequest(uid="bench", tensors=[part]), iter_as_aiter(split)
        )
        resp = await stub.rpc_sink_stream(reqs)
    else:
        resp = await stub.rpc_sink(runtime_pb2.ExpertRequest(uid="bench", tensors=[serialized]))
    return int(resp.metadata)


async def download(stub, nbytes: int) -> torch.Tensor:
    """One tensor server -> client the way hivemind's expert_forward receives its outputs."""
    if nbytes > MAX_UNARY_PAYLOAD_SIZE:
        outputs = await stub.rpc_source_stream(test_pb2.TestRequest(number=nbytes))
        (t,) = await deserialize_tensor_stream(amap_in_executor(lambda msg: msg.tensors, outputs))
    else:
        resp = await stub.rpc_source(test_pb2.TestRequest(number=nbytes))
        (t,) = [deserialize_torch_tensor(x) for x in resp.tensors]
    return t


async def raw_upload(p2p: P2P, peer: PeerID, data: bytes) -> int:
    _, reader, writer = await p2p.call_binary_stream_handler(peer, RAW_HANDLER_UP)
    try:
        await P2P.send_raw_data(data, writer)
        return int.from_bytes(await P2P.receive_raw_data(reader), "big")
    finally:
        writer.close()


async def raw_download(p2p: P2P, peer: PeerID, nbytes: int) -> bytes:
    _, reader, writer = await p2p.call_binary_stream_handler(peer, RAW_HANDLER_DOWN)
    try:
        await P2P.send_raw_data(nbytes.to_bytes(8, "big"), writer)
        return await P2P.receive_raw_data(reader)
    finally:
        writer.close()


def path_for(nbytes: int) -> str:
    if nbytes > MAX_UNARY_PAYLOAD_SIZE:
        return "protobuf stream, float32 tensor, 4 MiB parts (split_for_streaming, deserialize_tensor_stream)"
    return "unary protobuf, float32 tensor in one ExpertRequest/ExpertResponse (<= 2 MiB, as hivemind MoE)"


async def timed(metric: str, count: int, nbytes: int, call, check, path: str) -> None:
    """count calls of call(); MiB/s per call; one line (or an error line; nothing if not wanted)."""
    if METRICS is not None and metric not in METRICS:
        return
    try:
        speeds = []
        for _ in range(count):
            t = time.perf_counter()
            got = await asyncio.wait_for(call(), CALL_TIMEOUT_S)
            speeds.append(nbytes / MIB / (time.perf_counter() - t))
            check(got)
        line(metric, speeds, path)
    except Exception as e:
        error(metric, e)


def expect(what: str, want: int, got: int) -> None:
    if want != got:
        raise RuntimeError(f"{what}: got {got} bytes, expected {want}")


METRICS: set[str] | None = None  # --metrics: the figures measured (None: all)


def want(metric: str) -> bool:
    return METRICS is None or metric in METRICS


async def client(server: str, runs: int, rtt_calls: int, host: str) -> int:
    p2p = await P2P.create(initial_peers=[server], **listen(host))
    peer = PeerID.from_base58(server.rsplit("/p2p/", 1)[1])
    stub = RpcBench.get_stub(p2p, peer)

    # warm-up: unary, then each large path: 5 calls at 1 MiB, 1 at 64 MiB
    for i in range(50):
        await asyncio.wait_for(stub.rpc_echo(test_pb2.TestRequest(number=i)), CALL_TIMEOUT_S)
    for size, calls, label in ((MIB, 5, "1mib"), (64 * MIB, 1, "64mib")):
        try:
            for _ in range(calls):
                if want(f"up_{label}_mibs"):
                    await asyncio.wait_for(upload(stub, tensor(size)), CALL_TIMEOUT_S)
                if want(f"down_{label}_mibs"):
                    await asyncio.wait_for(download(stub, size), CALL_TIMEOUT_S)
                if want(f"up_{label}_raw_mibs"):
                    await asyncio.wait_for(raw_upload(p2p, peer, raw(size)), CALL_TIMEOUT_S)
                if want(f"down_{label}_raw_mibs"):
                    await asyncio.wait_for(raw_download(p2p, peer, size), CALL_TIMEOUT_S)
        except Exception:
            pass  # reported by the measured calls below

    try:
        batches = []
        for _ in range(runs if want("rtt_ms") else 0):
            samples = []
            for i in range(rtt_calls):
                t = time.perf_counter()
                # no asyncio.wait_for here: with a timeout it wraps each call in a task (~+0.05 ms);
                # the driver's per-anchor timeout bounds this loop
                r = await stub.rpc_echo(test_pb2.TestRequest(number=i))
                samples.append((time.perf_counter() - t) * 1000)
                if r.number != i:
                    raise RuntimeError(f"echo returned {r.number}, expected {i}")
            batches.append(statistics.median(samples))
        if batches:
            line(
                "rtt_ms",
                batches,
                "unary protobuf (test_pb2.TestRequest -> TestResponse, daemon persistent connection)",
                calls_per_run=rtt_calls,
            )
    except Exception as e:
        error("rtt_ms", e)

    for size, label in ((64 * MIB, "64mib"), (MIB, "1mib")):
        count = runs if size > MIB else max(runs, 20)
        t = tensor(size)

        def check_tensor(got, size=size):
            expect("download", size, got.numel() * got.element_size())

        await timed(
            f"up_{label}_mibs",
            count,
            size,
            lambda t=t: upload(stub, t),
            lambda got, size=size: expect("upload", size, got),
            path_for(size),
        )
        down = lambda size=size: download(stub, size)  # noqa: E731
        await timed(f"down_{label}_mibs", count, size, down, check_tensor, path_for(size))
        data = raw(size)
        raw_path = "binary stream, raw bytes (send_raw_data / receive_raw_data, one stream per call)"
        await timed(
            f"up_{label}_raw_mibs",
            count,
            size,
            lambda data=data: raw_upload(p2p, peer, data),
            lambda got, size=size: expect("raw upload", size, got),
            raw_path,
        )
        await timed(
            f"down_{label}_raw_mibs",
            count,
            size,
            lambda size=size: raw_download(p2p, peer, size),
            lambda got, size=size: expect("raw download", size, len(got)),
            raw_path,
        )

    await p2p.shutdown()
    return 0


def main() -> int:
    global CALL_TIMEOUT_S, METRICS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=("server", "client"), required=True)
    ap.add_argument("--server", help="client: the server's ADDR line (/ip4/.../tcp/P/p2p/ID)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rtt-calls", type=int, default=400, help="unary calls per run (median per run)")
    ap.add_argument("--max-seconds", type=float, default=900, help="server: serve at most this long")
    ap.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    ap.add_argument("--metrics", default="", help="client: only these figures (comma-separated)")
    ap.add_argument("--call-timeout", type=float, default=CALL_TIMEOUT_S, help="seconds per call")
    args = ap.parse_args()
    CALL_TIMEOUT_S = args.call_timeout
    METRICS = {m for m in args.metrics.split(",") if m} or None
    if args.role == "client" and not args.server:
        ap.error("--role client needs --server ADDR")
    try:
        if args.role == "server":
            return asyncio.run(serve(args.max_seconds, args.host))
        return asyncio.run(client(args.server, max(1, args.runs), max(1, args.rtt_calls), args.host))
    finally:
        _common.kill_descendants()


if __name__ == "__main__":
    sys.exit(main())
