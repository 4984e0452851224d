"""RPC limits (issue 16, defects 1, 5, 6, 14): payload limits per method checked before reading,
memory reserved per message, call caps per peer, the idle reaper, upload staging quotas, and tensor
descriptors that numpy would refuse. Real nodes over loopback; the codec is also fuzzed."""

from __future__ import annotations

import struct
import zlib

import msgpack
import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lattice import Node, NodeConfig
from lattice.codec import compression, tensors
from lattice.errors import PayloadError, StreamError
from lattice.rpc import MethodNotFound, RemoteError, RPCConfig, lane, wire
from lattice.rpc.service import PROTOCOL_ID, RPC

MIB = 1 << 20


async def start_pair(tmp_path, nursery, config: RPCConfig, max_memory: str = "0", third: bool = False):
    """Node a (serving, with ``config`` and ``max_memory``) and b (and c) connected to it."""
    box: dict = {}
    ready = trio.Event()

    def cfg(name, memory="0"):
        return NodeConfig(
            listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / name, control=False, max_memory=memory
        )

    async def run():
        async with (
            Node(cfg("a", max_memory), services=[RPC(config)]) as a,
            Node(cfg("b")) as b,
            Node(cfg("c")) as c,
        ):
            a.rpc.register("echo", lambda x: x, max_payload=64 * MIB)
            box.update(a=a, b=b, c=c, peer=await b.connect(a.addrs[0]))
            if third:
                await c.connect(a.addrs[0])
            ready.set()
            await trio.sleep_forever()

    nursery.start_soon(run)
    await ready.wait()
    return box["a"], box["b"], box["c"], box["peer"]


def rpc_memory(node) -> dict:
    """The "rpc" service scope of the node's resource manager: memory now and at peak."""
    row = node.host.resources.stats()["services"].get("rpc", {})
    return {"memory": row.get("memory", 0), "peak": row.get("peak_memory", 0)}


def call_bytes(method: str, size: int, send: int | None = None, call_id=None) -> bytes:
    """Negotiation and a call declaring a ``size``-byte tensor, with ``send`` payload bytes (all of
    it and its checksum if None)."""
    desc = msgpack.packb(["uint8", [size], size, "numpy", None, None])
    doc = msgpack.packb(msgpack.ExtType(1, desc))
    head = wire.encode_header(wire.CALL, doc, size, method=method, last=True, call_id=call_id)
    body = bytes(size) + struct.pack(">I", zlib.crc32(bytes(size))) if send is None else bytes(send)
    return head + body


async def reply_of(stream) -> wire.Message | str:
    """The callee's answer on a raw call stream (negotiated with new_stream), or "reset"."""
    try:
        with trio.fail_after(10):
            return await wire.receive(stream, 1 << 30)
    except StreamError:
        return "reset"


# -- defect 14: descriptors numpy would refuse, fuzzed
def test_shapes_whose_nonzero_dims_overflow_are_payload_errors():
    doc = msgpack.packb(
        msgpack.ExtType(1, msgpack.packb(["float32", [1 << 31, 1 << 31, 0], 0, "numpy", None, None]))
    )
    with pytest.raises(PayloadError, match="shape"):
        tensors.parse(doc, 4 << 30)
    with pytest.raises(PayloadError, match="shape"):
        compression.decompress(
            "fp16", np.zeros(0, np.float16), {"shape": [1 << 31, 1 << 31, 0], "dtype": "float32"}, 0
        )
    ok = msgpack.packb(msgpack.ExtType(1, msgpack.packb(["float32", [0, 1024, 3], 0, "numpy", None, None])))
    value, (spec,) = tensors.parse(ok, 1 << 20)
    tensors.allocate(spec)
    assert tensors.finish(value).shape == (0, 1024, 3)


def test_a_compressed_tensor_may_not_decode_past_the_limit():
    """Top-k of one value claiming 2**31 elements: 8 bytes on the wire, 8 GiB decoded (16 GiB as
    float64). The decoded size is known from the descriptor and bounded before decoding."""
    meta = {"shape": [1 << 31], "dtype": "float64", "k": 1}
    doc = msgpack.packb(msgpack.ExtType(1, msgpack.packb(["uint8", [8], 8, "numpy", "topk", meta])))
    value, (spec,) = tensors.parse(doc, 1 << 20)
    assert spec.decoded == 8 << 31 and tensors.message_bytes([spec]) == 8 + (8 << 31)
    tensors.allocate(spec)[:] = bytes(8)
    with pytest.raises(PayloadError, match="decode"):
        tensors.finish(value, max_bytes=16 * MIB)


_dims = st.one_of(
    st.integers(0, 4), st.integers(0, 1 << 40), st.sampled_from([1 << 16, 1 << 20, 1 << 31, 1 << 63, -1]),
    st.booleans(), st.floats(allow_nan=False), st.none(),
)  # fmt: skip
_big = st.lists(st.sampled_from([0, 1, 3, 1 << 16, 1 << 20, 1 << 31]), max_size=8)  # overflow with a 0
_shapes = st.one_of(_big, st.lists(_dims, max_size=40), st.integers(-(1 << 63), 1 << 63), st.text(max_size=3))
_meta_fields = {
    "shape": _shapes,
    "dtype": st.sampled_from(["float32", "float64", "float16", "int8", 3]),
}
_meta_options = {"k": st.integers(-2, 1 << 33), "scale": st.floats(), "block": st.integers(-1, 1 << 17)}
_meta = st.one_of(st.none(), st.text(max_size=3), st.fixed_dictionaries(_meta_fields, optional=_meta_options))
_dtypes = st.sampled_from(["uint8", "float32", "float64", "int64", "bool", "bfloat16", "object", "x", 5])
_codecs = st.sampled_from([None, "fp16", "bf16", "int8", "int8-block", "topk", "topk:0.5", "nope", 7])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=_dtypes, shape=_shapes, nbytes=st.one_of(st.integers(-1, 4096), st.integers(0, 1 << 40)),
    codec=_codecs, meta=_meta, origin=st.sampled_from(["numpy", "torch", "x"]), count=st.integers(1, 3),
    fill=st.binary(max_size=64),
)  # fmt: skip
@example(  # numpy refuses the shape although the descriptor is consistent
    dtype="float32",
    shape=[1 << 31, 1 << 31, 0],
    nbytes=0,
    codec=None,
    meta=None,
    origin="numpy",
    count=1,
    fill=b"",
)
@example(  # top-k of 8 bytes claiming 2**31 float64 values: 16 GiB decoded
    dtype="uint8", shape=[8], nbytes=8, codec="topk", meta={"shape": [1 << 31], "dtype": "float64", "k": 1},
    origin="numpy", count=1, fill=b"",
)  # fmt: skip
def test_fuzzed_descriptors_raise_only_payload_errors(dtype, shape, nbytes, codec, meta, origin, count, fill):
    """parse, allocate and finish (decoding included) on arbitrary descriptors: a value, or a
    PayloadError. Parsed with the default 4 GiB message limit; filled only when small."""
    limit = 4 << 30
    desc = msgpack.packb([dtype, shape, nbytes, origin, codec, meta])
    doc = msgpack.packb([msgpack.ExtType(1, desc)] * count)
    try:
        value, specs = tensors.parse(doc, limit)
    except PayloadError:
        return
    assert sum(s.nbytes for s in specs) <= limit
    if sum(s.nbytes for s in specs) > MIB:
        return  # valid, and too large to fill here
    for spec in specs:
        buf = tensors.allocate(spec)
        data = (fill * (len(buf) // max(1, len(fill)) + 1))[: len(buf)] if fill else bytes(len(buf))
        buf[:] = data
    try:
        out = tensors.finish(value, False, 16 * MIB)
    except PayloadError:
        return
    for arr in out:
        assert isinstance(arr, np.ndarray) and arr.nbytes <= 16 * MIB


# -- defect 1: method first, limits, reservations
async def test_method_and_limit_are_checked_before_the_payload(tmp_path, nursery):
    a, b, _c, peer = await start_pair(tmp_path, nursery, RPCConfig(max_message=1 << 30))
    a.rpc.register("small", lambda x: x.nbytes)  # the default limit: 16 MiB
    a.rpc.register("large", lambda x: x.nbytes, max_payload=40 * MIB)
    big = np.zeros(32 * MIB, dtype=np.uint8)
    with pytest.raises(MethodNotFound):
        await b.rpc.call(peer, "missing", big)
    with pytest.raises(RemoteError, match="over the limit of 16777216 bytes for small") as err:
        await b.rpc.call(peer, "small", big)
    assert err.value.type == "PayloadError"
    assert rpc_memory(a)["peak"] == 0  # refused from the header: nothing reserved, nothing read
    assert 0.5 < a.host.limits.score(b.host.peer_id) <= 1.0  # a throttle point (MethodNotFound: none)
    assert await b.rpc.call(peer, "large", big) == big.nbytes
    assert rpc_memory(a) == {"memory": 0, "peak": big.nbytes}  # reserved while held, then released
    assert await b.rpc.call(peer, "small", np.zeros(16 * MIB, np.uint8)) == 16 * MIB  # at the limit


async def test_messages_are_reserved_from_the_peer_budget(tmp_path, nursery):
    """max_memory 64 MiB: a peer may hold a quarter (16 MiB, its stream windows included)."""
    a, b, c, peer = await start_pair(tmp_path, nursery, RPCConfig(), max_memory="64MiB", third=True)
    with pytest.raises(RemoteError, match="Overloaded: memory budget of the peer exhausted"):
        await b.rpc.call(peer, "echo", np.zeros(20 * MIB, np.uint8))
    assert (await c.rpc.call(peer, "echo", np.arange(3))).tolist() == [0, 1, 2]  # others are served
    assert (await b.rpc.call(peer, "echo", np.ones(6 * MIB, np.uint8))).nbytes == 6 * MIB
    assert rpc_memory(a)["memory"] == 0


async def test_streaming_messages_hold_one_reservation_at_a_time(tmp_path, nursery):
    a, b, _c, peer = await start_pair(tmp_path, nursery, RPCConfig())

    @a.rpc.method("total", stream="client", max_payload=8 * MIB)
    async def total(values):
        return sum([float(v.sum()) async for v in values])

    chunks = [np.ones(MIB, dtype=np.float32) for _ in range(5)]  # 4 MiB each, 20 MiB in all
    assert await b.rpc.call_client_stream(peer, "total", chunks) == 5 * MIB
    assert rpc_memory(a) == {"memory": 0, "peak": 4 * MIB}
    with pytest.raises(RemoteError, match="over the limit of 8388608 bytes for total"):
        await b.rpc.call_client_stream(peer, "total", [np.ones(3 * MIB, dtype=np.float32)])


# -- defect 5: call caps per peer (fast lane included) and the idle reaper
async def test_inbound_calls_are_capped_per_peer(tmp_path, nursery):
    config = RPCConfig(max_inbound_per_peer=4, max_inbound_calls=6, min_inbound_per_peer=2)
    a, b, c, peer = await start_pair(tmp_path, nursery, config, third=True)
    release = trio.Event()

    @a.rpc.method("wait")
    async def wait(x):
        await release.wait()
        return x

    results: list = []

    async def one(node, payload):
        try:
            results.append(await node.rpc.call(peer, "wait", payload, timeout=10))
        except RemoteError as exc:
            results.append(exc.remote_message)

    async with trio.open_nursery() as calls:
        for i in range(5):  # small: the fast lane
            calls.start_soon(one, b, i)
        calls.start_soon(one, b, np.zeros(100_000, np.uint8))  # large: a stream of its own
        with trio.fail_after(5):
            while len(results) < 2:
                await trio.sleep(0.01)
        assert a.rpc.inbound_calls == 4
        for i in range(4):  # the node is at 6 only after c's first two: its minimum
            calls.start_soon(one, c, 100 + i)
        with trio.fail_after(5):
            while len(results) < 4:
                await trio.sleep(0.01)
        assert a.rpc.inbound_calls == 6
        release.set()
    refusals = [r for r in results if isinstance(r, str)]
    assert len(refusals) == 4 and all("too many calls in progress" in r for r in refusals), results
    assert sum(1 for r in refusals if "from this peer" in r) == 2
    assert a.rpc.inbound_calls == 0


async def test_stalled_messages_are_reset_after_the_idle_timeout(tmp_path, nursery):
    a, b, _c, peer = await start_pair(tmp_path, nursery, RPCConfig(message_idle_timeout=0.6))
    conn = b.host.connection_to(a.host.peer_id)
    stalled = await b.host.new_stream(conn, [PROTOCOL_ID])
    await stalled.write(call_bytes("echo", 4 * MIB, send=1024))  # declares 4 MiB, sends 1 KiB
    message = call_bytes("echo", 64 * 1024)
    start = len(message) - 64 * 1024 - 4 + 1024
    slow = await b.host.new_stream(conn, [PROTOCOL_ID])
    await slow.write(message[:start])
    started = trio.current_time()

    async def trickle():  # 8 KiB every 0.25 s: slower than the timeout in all, never idle that long
        for off in range(start, len(message), 8192):
            await trio.sleep(0.25)
            await slow.write(message[off : off + 8192])

    async with trio.open_nursery() as n:
        n.start_soon(trickle)
        assert await reply_of(stalled) == "reset"
        assert 0.6 <= trio.current_time() - started <= 2.5
    reply = await reply_of(slow)
    assert reply.kind == wire.MSG and reply.value.nbytes == 64 * 1024
    assert a.rpc.counters["idle_reset"] == 1 and a.rpc.inbound_calls == 0
    assert rpc_memory(a)["memory"] == 0
    assert await b.rpc.call(peer, "echo", 5) == 5


# -- the fast lane: small calls only, limits per call
async def test_lane_carries_small_calls_and_checks_each_against_its_method(tmp_path, nursery):
    a, b, _c, peer = await start_pair(tmp_path, nursery, RPCConfig())
    a.rpc.register("tiny", lambda x: float(x.sum()), max_payload=128 * 1024)
    x = np.random.default_rng(0).standard_normal(200_000).astype(np.float32)  # 800 KB decoded
    with pytest.raises(RemoteError, match="over the limit of 131072 bytes for tiny"):
        await b.rpc.call(peer, "tiny", x, codec="topk:0.01")  # 16 KB on the wire: the lane
    assert await b.rpc.call(peer, "echo", 3) == 3
    assert a.rpc.counters["malformed"] == 0  # answered on its own: the lane was not dropped as broken
    rogue = await b.host.new_stream(b.host.connection_to(a.host.peer_id), [lane.PROTOCOL_ID])
    await rogue.write(call_bytes("echo", 1 * MIB, call_id=1))  # more than a lane call may carry
    reply = await reply_of(rogue)
    assert reply.kind == wire.ERR and "over the limit of 65536" in reply.error_message


# -- defect 6: upload staging
async def test_upload_staging_quotas_and_expiry(tmp_path, nursery):
    config = RPCConfig(upload_peer_bytes=32 * MIB, upload_peer_count=2, upload_first_chunk_timeout=0.5,
                       message_idle_timeout=0.4)  # fmt: skip
    a, b, _c, peer = await start_pair(tmp_path, nursery, config)

    def begin(n: int, tid: bytes) -> dict:
        return {"id": tid, "dtype": "uint8", "shape": [n], "chunk": 8 * MIB}

    await b.rpc.call(peer, "lattice.upload.begin", begin(24 * MIB, b"a" * 16))
    assert rpc_memory(a)["memory"] == 24 * MIB  # reserved from b's budget at begin
    with pytest.raises(RemoteError, match="staging quota of 33554432"):
        await b.rpc.call(peer, "lattice.upload.begin", begin(16 * MIB, b"b" * 16))
    await b.rpc.call(peer, "lattice.upload.begin", begin(1 * MIB, b"c" * 16))
    with pytest.raises(RemoteError, match="too many uploads in progress"):
        await b.rpc.call(peer, "lattice.upload.begin", begin(1 * MIB, b"d" * 16))
    await trio.sleep(0.3)
    assert await b.rpc.call(peer, "lattice.upload.begin", begin(24 * MIB, b"a" * 16)) == {"have": []}
    await trio.sleep(0.6)  # 0.9 s after begin: a re-begin does not extend the first-chunk deadline
    assert a.rpc.uploads.staged_bytes == 0 and rpc_memory(a)["memory"] == 0
    x = np.arange(5 * MIB, dtype=np.uint8)  # an upload that makes progress is kept and committed
    assert np.array_equal(await b.rpc.call(peer, "echo", x, resumable=True, timeout=20), x)
    assert a.rpc.uploads.staged_bytes == 0 and rpc_memory(a)["memory"] == 0


def test_a_zero_dimensional_tensor_decodes_to_an_array():
    """Found by the fuzz test above: bf16 data of shape [] decoded to a numpy scalar, not an array."""
    wire = np.array(16320, dtype=np.uint16).reshape(())  # 1.5 in bfloat16
    out, dtype = compression.decompress("bf16", wire, {"shape": [], "dtype": "float32"}, 16)
    assert isinstance(out, np.ndarray) and out.shape == () and float(out) == 1.5 and dtype == "float32"
