"""lattice.codec.smallpack: the same bytes as msgpack for what it covers, msgpack's result or MISSING
for anything it reads (never a different value), and small calls over it between real nodes."""

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from lattice.codec import smallpack, tensors
from lattice.rpc import wire

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.binary(max_size=70_000)
    | st.text(max_size=300)
)
edges = [0, 127, 128, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, (1 << 64) - 1,
         -1, -32, -33, -128, -129, -32768, -32769, -(1 << 31), -(1 << 31) - 1, -(1 << 63)]  # fmt: skip


@given(scalars)
@settings(max_examples=400, deadline=None)
def test_pack_is_msgpacks_bytes(value):
    assert smallpack.pack(value) == msgpack.packb(value, use_bin_type=True)


def test_int_edges_and_out_of_subset():
    for v in edges:
        assert smallpack.pack(v) == msgpack.packb(v, use_bin_type=True)
    for v in (1 << 64, -(1 << 63) - 1, 1.5, [1], {"a": 1}, bytearray(b"x"), "\ud800"):
        assert smallpack.pack(v) is None  # left to msgpack (which packs or refuses it)


@given(st.dictionaries(st.text(max_size=40), scalars, max_size=16))
@settings(max_examples=300, deadline=None)
def test_map_round_trip(items):
    packed = smallpack.pack_map(items)  # None (msgpack's job): over 15 keys, or a key not short ASCII
    if packed is None:
        assert len(items) > 15 or any(len(k) > 31 or not k.isascii() for k in items)
        packed = msgpack.packb(items, use_bin_type=True)
    else:
        assert packed == msgpack.packb(items, use_bin_type=True)
    got = smallpack.unpack(packed, 1 << 20)
    assert got is smallpack.MISSING or got == msgpack.unpackb(packed, raw=False)
    if len(items) <= 15:
        assert got == items


@given(st.binary(max_size=64))
@settings(max_examples=3000, deadline=None)
def test_unpack_never_disagrees_with_msgpack(data):
    got = smallpack.unpack(data, 1 << 20)
    if got is smallpack.MISSING:
        return
    assert got == msgpack.unpackb(data, raw=False, strict_map_key=False)


def test_unpack_refuses_truncated_oversized_and_trailing():
    good = msgpack.packb({"k": "call", "d": b"x" * 300}, use_bin_type=True)
    assert smallpack.unpack(good, 1 << 20) == {"k": "call", "d": b"x" * 300}
    assert smallpack.unpack(good[:-1], 1 << 20) is smallpack.MISSING
    assert smallpack.unpack(good + b"\x00", 1 << 20) is smallpack.MISSING
    assert smallpack.unpack(good, 299) is smallpack.MISSING  # over the bin limit
    assert smallpack.unpack(b"\xa2\xff\xfe", 10) is smallpack.MISSING  # invalid UTF-8
    assert smallpack.unpack(b"\x81\x01\x02", 10) is smallpack.MISSING  # int key


def test_wire_and_tensors_use_it_with_the_same_bytes():
    head = wire.encode_header(wire.CALL, b"\xc4\x01x", 0, method="m", last=True, call_id=7)
    body = msgpack.packb(
        {"k": "call", "n": 0, "z": 1, "i": 7, "d": b"\xc4\x01x", "m": "m"}, use_bin_type=True
    )
    assert head == len(body).to_bytes(4, "big") + body
    assert tensors.encode(b"abc") == (msgpack.packb(b"abc", use_bin_type=True), [])
    assert tensors.parse(msgpack.packb({"a": [1, 2]}), 100) == ({"a": [1, 2]}, [])  # msgpack's path
    assert tensors.parse(msgpack.packb({"a": 1}), 100) == ({"a": 1}, [])
