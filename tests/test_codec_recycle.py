"""Recycled receive buffers (codec.buffers.BufferRecycler) and the float16 casts (codec.compression.cast):
a buffer is handed out again only once nothing refers to it, and the casts give numpy's values."""

from __future__ import annotations

import numpy as np
import torch

from lattice.codec import buffers, compression, tensors

MIB = 1 << 20


def test_a_free_buffer_of_the_same_size_is_reused() -> None:
    r = buffers.BufferRecycler()
    a = r.take(4 * MIB)
    address = a.ctypes.data
    assert address % buffers.PAGE == 0
    del a
    b = r.take(4 * MIB)
    assert b.ctypes.data == address and r.reused == 1
    assert r.take(2 * MIB).ctypes.data != address  # another size: a new buffer


def test_a_buffer_still_referred_to_is_never_reused() -> None:
    r = buffers.BufferRecycler()
    a = r.take(4 * MIB)
    address = a.ctypes.data
    held = [a[10:20], memoryview(a), torch.from_numpy(a.view(np.float32)).view(-1, 2)]
    del a
    for i in range(len(held)):  # each kind of reference alone keeps the buffer in use
        keep = held[i]
        held[i] = None
        others = [r.take(4 * MIB) for _ in range(2)]
        assert all(o.ctypes.data != address for o in others)
        del keep, others
        held[i] = None
    assert r.take(4 * MIB).ctypes.data == address


def test_bounded_by_max_bytes() -> None:
    r = buffers.BufferRecycler(buffers.RecycleConfig(max_bytes=10 * MIB, min_bytes=MIB))
    kept = [r.take(4 * MIB) for _ in range(4)]  # the last two are beyond the bound: not kept
    assert r.held_bytes() <= 10 * MIB
    del kept
    r.take(3 * MIB)  # free buffers of another size make room, least recently used first
    assert r.held_bytes() <= 10 * MIB
    r.take(MIB - 1)  # below min_bytes: a plain allocation, not kept
    assert r.held_bytes() <= 10 * MIB


def test_received_tensors_land_in_recycled_buffers() -> None:
    value = {"x": np.arange(1 << 20, dtype=np.float32)}
    doc, parts = tensors.encode(value)
    payload = b"".join(bytes(b) for b in parts)
    before = buffers.RECYCLER.reused
    for _ in range(3):  # what wire.receive does for each message
        placeholders, specs = tensors.parse(doc, 1 << 30)
        tensors.allocate(specs[0])[:] = payload
        got = tensors.finish(placeholders)
        assert np.array_equal(got["x"], value["x"])
        del got, placeholders, specs
    assert buffers.RECYCLER.reused >= before + 2


def test_fp16_casts_are_numpys_bit_for_bit() -> None:
    rng = np.random.default_rng(1)
    a = (rng.standard_normal(1 << 18) * np.exp(rng.uniform(-30, 14, 1 << 18))).astype(np.float32)
    a[:8] = [np.inf, -np.inf, np.nan, 0.0, -0.0, 65504.0, 65520.0, 6e-8]  # overflow, subnormal, NaN
    with np.errstate(over="ignore"):
        want16 = a.astype(np.float16)
    got16 = compression.cast(a, np.float16)
    assert np.array_equal(got16.view(np.uint16), want16.view(np.uint16))
    assert np.array_equal(
        compression.cast(got16, np.float32).view(np.uint32), want16.astype(np.float32).view(np.uint32)
    )
    c = compression.compress("fp16", a)
    out, _ = compression.decompress("fp16", c.data, c.meta, a.size)
    assert np.array_equal(out.view(np.uint32), want16.astype(np.float32).view(np.uint32))
