"""Tensor RPC between real nodes over loopback (and real processes where a peer must die)."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import msgpack
import numpy as np
import pytest
import trio

from conftest import rpc_pair
from lattice import Node, NodeConfig
from lattice.codec import compression
from lattice.errors import StreamError
from lattice.identity import PeerId
from lattice.multiaddr import Multiaddr
from lattice.rpc import MethodNotFound, PayloadError, RemoteError, RPCError, RPCTimeout
from lattice.rpc.service import PROTOCOL_ID


def _cfg(tmp_path, name):
    return NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / name, control=False)


@pytest.fixture
async def pair(tmp_path, nursery):
    """Two running nodes, b connected to a; a serves 'echo'."""
    return await rpc_pair(tmp_path, nursery)


DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
          "float16", "float32", "float64", "complex64", "complex128"]  # fmt: skip


def _sample(dtype: str, shape) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.asarray(rng.standard_normal(shape) * 100).astype(dtype)


async def test_roundtrip_every_dtype_and_shape(pair):
    _a, b, peer = pair
    shapes = [(), (0,), (7,), (3, 4), (2, 3, 4, 5), (1, 1, 1, 1, 1, 1)]
    for dtype in DTYPES:
        for shape in shapes:
            x = _sample(dtype, shape)
            y = await b.rpc.call(peer, "echo", x)
            assert y.dtype == x.dtype and y.shape == x.shape and np.array_equal(x, y), (dtype, shape)
    strided = np.arange(100, dtype=np.float32).reshape(10, 10)[::2, ::3]
    assert np.array_equal(await b.rpc.call(peer, "echo", strided), strided)
    nested = {"w": [np.ones(3), {"deep": np.zeros((2, 2), np.int8)}], "s": "text", "n": None, "b": b"\x00raw"}
    out = await b.rpc.call(peer, "echo", nested)
    assert out["s"] == "text" and out["n"] is None and out["b"] == b"\x00raw"
    assert np.array_equal(out["w"][1]["deep"], nested["w"][1]["deep"])


@pytest.mark.parametrize(
    "codec, tol", [("fp16", 1e-3), ("bf16", 1e-2), ("int8", 2e-2), ("int8-block", 2e-2), ("topk:1.0", 0)]
)
async def test_roundtrip_codecs(pair, codec, tol):
    _a, b, peer = pair
    x = np.random.default_rng(1).standard_normal((64, 33)).astype(np.float32)
    y = await b.rpc.call(peer, "echo", {"g": x, "i": np.arange(5)}, codec=codec)
    assert y["g"].shape == x.shape and y["g"].dtype == np.float32
    assert np.max(np.abs(y["g"] - x)) <= tol * np.max(np.abs(x)) + 1e-6
    assert np.array_equal(y["i"], np.arange(5))  # integer tensors are never compressed


async def test_streaming_forms(pair):
    a, b, peer = pair

    @a.rpc.method("count", stream="server")
    async def count(n):
        for i in range(n):
            yield np.full(3, i)

    @a.rpc.method("total", stream="client")
    async def total(values):
        acc = 0
        async for v in values:
            acc = acc + v
        return acc

    @a.rpc.method("double", stream="bidi")
    async def double(stream):
        async for v in stream:
            await stream.send(v * 2)

    async with b.rpc.call_stream(peer, "count", 4) as items:
        got = [x.tolist() async for x in items]
    assert got == [[i] * 3 for i in range(4)]
    assert np.array_equal(await b.rpc.call_client_stream(peer, "total", [np.ones(2)] * 10), np.full(2, 10.0))
    async with b.rpc.open_stream(peer, "double") as s:
        for i in range(5):
            await s.send(np.array([i]))
            assert (await s.receive()).tolist() == [2 * i]


async def test_errors_are_reported_and_typed(pair):
    a, b, peer = pair

    @a.rpc.method("boom")
    async def boom(x):
        raise ValueError("no good")

    with pytest.raises(RemoteError) as err:
        await b.rpc.call(peer, "boom", 1)
    assert err.value.type == "ValueError" and "no good" in str(err.value)
    with pytest.raises(MethodNotFound):
        await b.rpc.call(peer, "nope", 1)
    with pytest.raises(PayloadError):
        await b.rpc.call(peer, "echo", object())
    assert await b.rpc.call(peer, "echo", 5) == 5


async def test_timeout_resets_only_the_stream_and_cancels_the_handler(pair):
    a, b, peer = pair
    cancelled = trio.Event()

    @a.rpc.method("slow")
    async def slow(x):
        try:
            await trio.sleep(30)
        finally:
            cancelled.set()

    start = trio.current_time()
    with pytest.raises(RPCTimeout):
        await b.rpc.call(peer, "slow", 1, timeout=0.2)
    assert trio.current_time() - start < 1.0
    with trio.fail_after(2):
        await cancelled.wait()
    assert (await b.rpc.call(peer, "echo", np.arange(3))).tolist() == [0, 1, 2]
    assert len(b.host.connections()) == 1


async def test_large_transfer_and_limit_checked_before_allocation(pair):
    _a, b, peer = pair
    x = np.random.default_rng(2).standard_normal(8 << 20).astype(np.float32)  # 32 MiB
    assert np.array_equal(await b.rpc.call(peer, "echo", x), x)
    too_big = np.zeros(80 << 20, dtype=np.uint8)  # the server's limit is 64 MiB
    with pytest.raises(RemoteError, match="over the limit"):
        await b.rpc.call(peer, "echo", too_big)
    assert await b.rpc.call(peer, "echo", 1) == 1


async def _raw_call(b, peer, payload: bytes) -> bytes:
    stream = await b.host.new_stream(PeerId.from_string(peer), [PROTOCOL_ID])
    await stream.write(payload, fin=True)
    out = bytearray()
    with trio.fail_after(5):
        try:
            while chunk := await stream.read():
                out += chunk
        except StreamError:
            pass  # the server resets a request it did not read to the end, after saying why
    return bytes(out)


def _frame(header: dict, body: bytes = b"") -> bytes:
    raw = msgpack.packb(header, use_bin_type=True)
    return struct.pack(">I", len(raw)) + raw + body


async def test_hostile_frames_are_rejected_and_node_keeps_serving(pair):
    a, b, peer = pair
    called = []
    a.rpc.register("record", lambda x: called.append(x))

    def desc(dtype, shape, nbytes):
        return msgpack.packb(msgpack.ExtType(1, msgpack.packb([dtype, shape, nbytes, "numpy", None, None])))

    def call(doc, n, body):
        return _frame({"k": "call", "m": "record", "d": doc, "n": n, "z": 1}, body)

    doc = desc("uint8", [10], 10)
    eight = b"x" * 8 + struct.pack(">I", zlib.crc32(b"x" * 8))
    cases = {
        "oversize header": struct.pack(">I", 1 << 30) + b"x" * 16,
        "garbage": b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1",
        "not a map": _frame([1, 2, 3]),
        "no call": _frame({"k": "msg", "n": 0}),
        "oversize payload": call(doc, 1 << 40, b""),
        "truncated": call(doc, 10, b"12345"),
        "bad crc": call(doc, 10, b"0123456789" + b"\0\0\0\0"),
        "bad dtype": call(desc("object", [1], 8), 8, eight),
        "shape mismatch": call(desc("uint8", [9], 8), 8, eight),
        "unknown ext": call(msgpack.packb(msgpack.ExtType(9, b"?")), 0, b""),
    }
    for name, payload in cases.items():
        reply = await _raw_call(b, peer, payload)
        assert reply, name
        stream_reply = bytearray(reply)
        (length,) = struct.unpack(">I", stream_reply[:4])
        header = msgpack.unpackb(stream_reply[4 : 4 + length])
        assert header["k"] == "err", name
    assert called == []  # no handler ever saw a short, corrupt or invalid tensor
    good = msgpack.packb(msgpack.ExtType(1, msgpack.packb(["uint8", [10], 10, "numpy", None, None])))
    ok = _frame(
        {"k": "call", "m": "record", "d": good, "n": 10, "z": 1},
        b"0123456789" + struct.pack(">I", zlib.crc32(b"0123456789")),
    )
    reply = await _raw_call(b, peer, ok)
    assert reply and called and called[0].tolist() == list(b"0123456789")
    assert (await b.rpc.call(peer, "echo", np.arange(4))).tolist() == [0, 1, 2, 3]


async def test_lane_deadlines_cancels_and_worker_reuse(pair):
    """Fast-lane calls keep their own deadlines (one timer per lane), a caller's own cancel scope
    stops the remote handler, and the callee's reused workers keep serving afterwards."""
    a, b, peer = pair
    started, cancelled = [], []

    @a.rpc.method("slow")
    async def slow(x):
        started.append(x)
        try:
            await trio.sleep(30)
        finally:
            cancelled.append(x)

    async with trio.open_nursery() as nursery:

        async def long_call():
            with pytest.raises(RPCTimeout):
                await b.rpc.call(peer, "slow", "long", timeout=3.0)

        nursery.start_soon(long_call)
        with trio.fail_after(2):
            while "long" not in started:
                await trio.sleep(0.01)
        start = trio.current_time()
        with pytest.raises(RPCTimeout):  # an earlier deadline than the one the timer waits for
            await b.rpc.call(peer, "slow", "short", timeout=0.2)
        assert trio.current_time() - start < 1.0
        with trio.move_on_after(0.2) as scope:  # the caller's own scope, not the call's timeout
            await b.rpc.call(peer, "slow", "scoped", timeout=30)
        assert scope.cancelled_caught
        with trio.fail_after(2):
            while not {"short", "scoped"} <= set(cancelled):
                await trio.sleep(0.01)
        for i in range(20):  # the workers whose calls were cancelled serve the next ones
            assert await b.rpc.call(peer, "echo", i) == i
    with trio.fail_after(2):  # the long call timed out too: its handler is cancelled
        while "long" not in cancelled:
            await trio.sleep(0.01)
    fast = b.rpc._lanes[PeerId.from_string(peer)]
    for i in range(3000):
        await b.rpc.call(peer, "echo", i)
    assert not fast.pending and len(fast._deadlines) <= 256 + 1  # finished calls' entries dropped


async def test_thousand_concurrent_calls(pair):
    _a, b, peer = pair
    results = []

    async def one(i):
        results.append(await b.rpc.call(peer, "echo", i))

    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            for i in range(1000):
                n.start_soon(one, i)
    assert sorted(results) == list(range(1000))


async def test_slow_consumer_does_not_kill_the_transfer(pair):
    a, b, peer = pair

    @a.rpc.method("slow_sum", stream="client")
    async def slow_sum(values):
        total = 0.0
        async for v in values:
            await trio.sleep(2.5)  # a long GPU step between reads; the sender waits on the window
            total += float(v.sum())
        return total

    chunks = [np.ones(2 << 20, dtype=np.float32) for _ in range(3)]  # 8 MiB each: more than a window
    with trio.fail_after(30):
        assert await b.rpc.call_client_stream(peer, "slow_sum", chunks) == 3 * (2 << 20)


def test_blocking_facade_and_control_client(tmp_path):
    from lattice import Client

    a = Node.start(_cfg(tmp_path, "a"))
    b = Node.start(NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / "b"))
    try:
        a.rpc.register("square", lambda x: x * x)  # a plain function: runs in a worker thread
        peer = b.connect(a.addrs[0])
        assert b.rpc.call(peer, "square", np.arange(4)).tolist() == [0, 1, 4, 9]
        with Client(tmp_path / "b" / "control.sock") as client:
            out = client.rpc.call(peer, "square", np.full((2, 2), 3.0))
            assert out.tolist() == [[9.0, 9.0], [9.0, 9.0]]
            assert client.rpc.methods() == b.rpc.methods
    finally:
        a.close()
        b.close()


def _start_bench_daemon(tmp_path, name):
    ready = tmp_path / f"{name}.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lattice.cli", "run", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir",
         str(tmp_path / name), "--ready-file", str(ready), "--enable-bench", "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "bench daemon did not start"
        time.sleep(0.02)
    return proc, json.loads(ready.read_text())


async def test_sigkilled_sender_gives_an_error_never_a_short_tensor(tmp_path):
    proc, info = _start_bench_daemon(tmp_path, "victim")
    try:
        async with Node(_cfg(tmp_path, "me")) as me:
            peer = await me.connect(info["addrs"][0])

            killer = threading.Timer(0.3, proc.send_signal, (signal.SIGKILL,))
            killer.start()
            with pytest.raises(RPCError):  # 1 GiB from the victim, which dies mid-transfer
                await me.rpc.call(peer, "lattice.bench.source", 1 << 30, timeout=60)
            killer.join()
    finally:
        proc.kill()
        proc.wait()


async def test_sigkilled_caller_never_reaches_the_handler(tmp_path):
    calls = []
    async with Node(_cfg(tmp_path, "server")) as server:
        server.rpc.register("take", lambda x: calls.append(x.nbytes), max_payload=256 << 20)
        code = (
            "import sys, numpy as np\n"
            "from lattice import Node, NodeConfig\n"
            "n = Node.start(NodeConfig(listen=['/ip4/127.0.0.1/tcp/0'], "
            f"data_dir={str(tmp_path / 'c')!r}, control=False))\n"
            "p = n.connect(sys.argv[1]); print('connected', flush=True)\n"
            "n.rpc.call(p, 'take', np.ones(256 << 20, dtype=np.uint8), timeout=60)\n"
        )
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", code, server.addrs[0]], stdout=subprocess.PIPE
        )
        try:
            with trio.fail_after(20):
                await proc.stdout.receive_some(100)
                await trio.sleep(0.4)  # mid-transfer
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await trio.sleep(0.5)
        finally:
            proc.kill()
        assert calls == []
        server.rpc.register("ping2", lambda x: x)
        async with Node(_cfg(tmp_path, "other")) as other:
            peer = await other.connect(server.addrs[0])
            assert await other.rpc.call(peer, "ping2", 7) == 7


def test_error_feedback_carries_dropped_mass():
    ef = compression.ErrorFeedback("topk:0.1")
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(1000).astype(np.float32) for _ in range(50)]
    sent = np.zeros(1000, dtype=np.float32)
    for g in grads:
        c = ef.compress("w", g)
        out, _ = compression.decompress(c.codec, c.data, c.meta, 1000)
        sent += out
    # everything not yet sent sits in the residual: sent + residual == sum of gradients
    assert np.allclose(sent + ef.residual["w"], np.sum(grads, axis=0), atol=1e-3)


@pytest.mark.parametrize(
    "meta",
    [{"shape": [10], "dtype": "float32", "k": 11}, {"shape": [-1], "dtype": "float32", "k": 1},
     {"shape": [10], "dtype": "object", "k": 1}, {"shape": [2**40], "dtype": "float32", "k": 1}, "nope"],
)  # fmt: skip
def test_malformed_codec_metadata_is_rejected(meta):
    with pytest.raises(PayloadError):
        compression.decompress("topk", np.zeros(8, np.uint8), meta, 1 << 20)


async def test_resumable_call_survives_dropped_connections(pair):
    a, b, peer = pair
    seen = []

    @a.rpc.method("apply")
    async def apply(t):
        seen.append(t)
        return float(t.sum())

    x = np.random.default_rng(5).standard_normal(6 << 20).astype(np.float32)  # 24 MiB, 3 chunks of 8 MiB
    chunk_calls = []
    original = b.rpc.call

    async def flaky_call(p, method, payload=None, **kw):
        if method == "lattice.upload.chunk":
            chunk_calls.append(payload["index"])
            if len(chunk_calls) == 2:  # the link drops while chunk 1 is in flight: it is lost
                await b.host.disconnect(PeerId.from_string(peer))
                raise RPCError("connection lost during the chunk")
        return await original(p, method, payload, **kw)

    b.rpc.call = flaky_call
    try:
        result = await original(peer, "apply", x, resumable=True, timeout=60)
    finally:
        b.rpc.call = original
    assert len(seen) == 1 and np.array_equal(seen[0], x) and result == pytest.approx(float(x.sum()), rel=1e-4)
    assert b.rpc.counters["resumed"] >= 1
    assert chunk_calls == [0, 1, 1, 2]  # after reconnecting, only the lost chunk is sent again
    assert a.rpc.uploads.staged_bytes == 0


async def test_upload_staging_is_bounded_and_owned(pair):
    a, b, peer = pair
    with pytest.raises(RemoteError, match="staging limit"):
        await b.rpc.call(peer, "lattice.upload.begin", {"id": b"0" * 16, "dtype": "uint8", "shape": [1 << 40],
                                                         "chunk": 8 << 20})  # fmt: skip
    with pytest.raises(RemoteError, match="unknown or expired"):
        await b.rpc.call(
            peer, "lattice.upload.chunk", {"id": b"1" * 16, "index": 0, "data": np.zeros(4, np.uint8)}
        )
    assert a.rpc.uploads.staged_bytes == 0


async def test_fast_lane_carries_small_calls_and_survives_garbage(pair):
    from lattice.rpc import lane

    _a, b, peer = pair
    pid = PeerId.from_string(peer)
    assert await b.rpc.call(peer, "echo", 1) == 1
    fast = b.rpc._lanes[pid]
    opened_before = fast.stream.session._next_id
    for i in range(50):
        assert await b.rpc.call(peer, "echo", i) == i
    # no stream per call (background protocols such as identify push may open one or two)
    assert b.rpc._lanes[pid] is fast and (fast.stream.session._next_id - opened_before) // 2 < 5
    # a hostile peer writes garbage on its own lane: that lane is dropped, nothing else is hurt
    rogue = await b.host.new_stream(pid, [lane.PROTOCOL_ID])
    await rogue.write(b"\x00\x00\x00\x04\xc1\xc1\xc1\xc1")
    got = bytearray()
    with trio.fail_after(5):
        try:
            while chunk := await rogue.read():
                got += chunk
        except StreamError:
            pass  # ended by a reset after the explanation
    (length,) = struct.unpack(">I", got[:4])
    assert msgpack.unpackb(bytes(got[4 : 4 + length]))["k"] == "err"
    assert await b.rpc.call(peer, "echo", "still fine") == "still fine"


async def test_fast_lane_rejects_a_corrupted_payload_and_serves_batched_calls(pair):
    """Complete messages are parsed in the connection's reader; a bad checksum still fails there."""
    from lattice.rpc import lane, wire

    a, b, peer = pair
    pid = PeerId.from_string(peer)
    arr = np.arange(16, dtype=np.float32)
    got = await b.rpc.call(peer, "echo", arr)
    assert isinstance(got, np.ndarray) and np.array_equal(got, arr)
    rogue = await b.host.new_stream(pid, [lane.PROTOCOL_ID])
    doc, buffers = wire.tensors.encode(arr)
    head = wire.encode_header(wire.CALL, doc, arr.nbytes, method="echo", last=True, call_id=1)
    good = head + bytes(buffers[0]) + struct.pack(">I", zlib.crc32(bytes(buffers[0])))
    batch = good + good.replace(b"\xa1i\x01", b"\xa1i\x02")  # two calls in one write: both answered
    await rogue.write(batch)
    replies = [await wire.receive(rogue, 1 << 20) for _ in range(2)]
    assert sorted(m.call_id for m in replies) == [1, 2]
    assert all(m.kind == "msg" and np.array_equal(m.value, arr) for m in replies)
    calls_before = a.rpc.counters["calls_in"]
    await rogue.write(head + bytes(buffers[0]) + struct.pack(">I", 12345))  # wrong checksum
    with trio.fail_after(5):
        err = await wire.receive(rogue, 1 << 20)
    assert err.kind == "err" and "checksum" in err.error_message
    assert a.rpc.counters["calls_in"] == calls_before  # the corrupted call never ran
    assert await b.rpc.call(peer, "echo", "still fine") == "still fine"


async def test_a_lane_call_cancelled_before_it_starts_never_runs(pair):
    """A call and its cancel in one write: the call is handed to a worker and cancelled before the
    worker runs it, so its handler never starts; the next call on the lane runs normally."""
    from lattice.rpc import lane, wire

    a, b, peer = pair
    ran = []

    @a.rpc.method("note")
    async def note(x):
        ran.append(x)
        return x

    rogue = await b.host.new_stream(PeerId.from_string(peer), [lane.PROTOCOL_ID])
    call = wire.small_message(wire.CALL, wire.tensors.encode(1), method="note", last=True, call_id=1)
    cancel = wire.encode_header(wire.CANCEL, call_id=1)
    await rogue.write(call + cancel)
    await rogue.write(
        wire.small_message(wire.CALL, wire.tensors.encode(2), method="note", last=True, call_id=2)
    )
    with trio.fail_after(5):
        reply = await wire.receive(rogue, 1 << 20)
    assert reply.call_id == 2 and reply.value == 2
    assert ran == [2]


async def test_lane_reopens_after_connection_loss(pair):
    _a, b, peer = pair
    pid = PeerId.from_string(peer)
    assert await b.rpc.call(peer, "echo", 1) == 1
    first = b.rpc._lanes[pid]
    await b.host.disconnect(pid)
    with trio.fail_after(10):
        assert await b.rpc.call(peer, "echo", 2) == 2  # redials from the peerstore, opens a new lane
    assert b.rpc._lanes[pid] is not first


async def test_a_call_never_lands_on_a_reachability_probe_connection(pair):
    """The flake behind a call failing right after a reconnect ("fast lane lost: connection lost:
    closed locally"): an AutoNAT dial-back, a fresh connection its dialer closes at once, was the
    only connection to the peer and the call opened its lane on it."""
    a, b, peer = pair
    pid = PeerId.from_string(peer)
    await b.host.wait_identified(pid)  # a's addresses are in b's peerstore: b can re-dial
    await b.host.disconnect(pid)
    addr = Multiaddr.parse(a.addrs[0]).without_peer()
    a.host.expect_probe(b.host.peer_id, 10.0)  # what an AutoNAT client asking for a check does
    sock = await trio.open_tcp_stream(*addr.tcp_target())
    probe = await b.host.adopt(sock, True, addr, expected=pid, probe=True)
    with trio.fail_after(5):
        while not a.host.connections_to(b.host.peer_id):
            await trio.sleep(0.01)
    assert b.host.connection_to(pid) is None and a.host.connection_to(b.host.peer_id) is None
    with trio.fail_after(10):
        assert await b.rpc.call(peer, "echo", 2) == 2  # dials a connection of its own
    assert b.rpc._lanes[pid].stream.session is not probe.session
    await probe.close()
    with trio.fail_after(10):
        assert await b.rpc.call(peer, "echo", 3) == 3


async def test_autonat_dial_backs_are_probes_on_both_sides(pair):
    a, b, peer = pair
    opened: list = []
    a.host.on_connect(opened.append)
    b.host.on_connect(opened.append)
    a.nat.autonat.per_peer_interval = 0.0  # b's own startup checks must not use up its allowance
    with trio.fail_after(10):
        while not b.nat.autonat.candidates():  # b has learned its observed address (identify)
            await trio.sleep(0.01)
    with trio.fail_after(15):
        result = await b.nat.autonat.check(b.host.connection_to(PeerId.from_string(peer)))
    assert result == "public", b.nat.autonat.results  # a reached b's listen address on loopback
    assert len(opened) >= 2 and all(conn.probe for conn in opened), [c.direction for c in opened]
    assert await b.rpc.call(peer, "echo", 4) == 4


TORCH_DTYPES = [
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "bool",
]


async def test_torch_tensors_roundtrip_including_bfloat16(pair):
    torch = pytest.importorskip("torch")
    _a, b, peer = pair
    for name in TORCH_DTYPES:
        dtype = getattr(torch, name)
        x = (torch.randn(4, 5) * 10).to(dtype)
        y = await b.rpc.call(peer, "echo", x)
        assert isinstance(y, torch.Tensor) and y.dtype == dtype and torch.equal(x, y), name
    strided = torch.arange(60, dtype=torch.float32).reshape(6, 10)[:, ::3].t()  # not contiguous
    assert torch.equal(await b.rpc.call(peer, "echo", strided), strided)
    as_numpy = await b.rpc.call(peer, "echo", torch.ones(3), as_torch=False)
    assert isinstance(as_numpy, np.ndarray) and as_numpy.tolist() == [1.0, 1.0, 1.0]
    as_tensor = await b.rpc.call(peer, "echo", np.ones(2), as_torch=True)
    assert isinstance(as_tensor, torch.Tensor)
    big = torch.randn(1 << 20, dtype=torch.bfloat16)  # 2 MiB: takes the per-call stream, not the lane
    assert torch.equal(await b.rpc.call(peer, "echo", big), big)
    approx = await b.rpc.call(peer, "echo", torch.randn(100), codec="bf16")
    assert approx.dtype == torch.float32


def test_payload_checksum_is_zlibs_crc32() -> None:
    """The fast crc32 (ISA-L) must equal zlib's: the wire format of older peers depends on it."""
    import os
    import zlib

    from lattice.rpc import wire

    data = os.urandom(1 << 20)
    view = memoryview(data)
    assert wire.crc32(data) == zlib.crc32(data)
    assert wire.crc32(view[3:70001], 12345) == zlib.crc32(view[3:70001], 12345)  # chained, unaligned
