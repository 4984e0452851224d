"""lattice.codec.packing: a reused packer per thread gives msgpack.packb's bytes, and refuses what
needs the tensor codec's ``default`` path (so tensors.encode falls back to it)."""

from __future__ import annotations

import threading

import msgpack
import numpy as np
import pytest

from lattice.codec import tensors
from lattice.codec.packing import pack_plain


@pytest.mark.parametrize(
    "value",
    [None, b"x" * 8, "é", 2**63, -(2**63), 1.5, [1, (2, 3)], {"k": "call", "d": b"\x00", "n": 0}, True],
)
def test_the_same_bytes_as_packb(value: object) -> None:
    assert pack_plain(value) == msgpack.packb(value, use_bin_type=True)


def test_arrays_are_refused_and_the_packer_stays_usable() -> None:
    with pytest.raises(TypeError):
        pack_plain({"a": 1, "t": np.zeros(2)})
    assert pack_plain([7]) == msgpack.packb([7])


def test_tensors_encode_takes_the_default_path_for_arrays_only() -> None:
    doc, buffers = tensors.encode({"w": np.arange(3, dtype=np.float32), "n": 1})
    assert len(buffers) == 1 and bytes(buffers[0]) == np.arange(3, dtype=np.float32).tobytes()
    value, specs = tensors.parse(doc, 1 << 20)
    assert value["n"] == 1 and len(specs) == 1
    assert tensors.encode(b"abc") == (msgpack.packb(b"abc", use_bin_type=True), [])
    assert tensors.encode(np.float32(2.0))[0] == msgpack.packb(2.0)  # numpy scalars: the default path


def test_threads_never_share_a_packer() -> None:
    errors: list[str] = []

    def worker(i: int) -> None:
        value = {"i": i, "blob": bytes([i]) * 1000, "items": list(range(i, i + 50))}
        want = msgpack.packb(value, use_bin_type=True)
        for _ in range(2000):
            if pack_plain(value) != want:
                errors.append(f"thread {i}")
                return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_packing_again_from_inside_a_pack_uses_another_packer() -> None:
    class Items(dict):  # a dict subclass whose items() runs Python code that packs
        def items(self):  # type: ignore[override]
            inner.append(pack_plain({"inner": [1, 2, 3]}))
            return super().items()

    inner: list[bytes] = []
    value = {"outer": Items(a=1, b="x")}
    assert pack_plain(value) == msgpack.packb({"outer": {"a": 1, "b": "x"}}, use_bin_type=True)
    assert inner == [msgpack.packb({"inner": [1, 2, 3]}, use_bin_type=True)]
