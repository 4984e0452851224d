"""Tensor codec: nested values with numpy arrays / torch tensors, as msgpack + raw buffers.

A value is encoded as a msgpack document in which every tensor is replaced by an ExtType descriptor
(dtype, shape, byte size, origin, codec) and the tensor bytes travel separately, in order, as the
message payload. Nothing is ever unpickled: the receiver only accepts plain msgpack types and
descriptors it validates (dtype from a fixed list, shape and sizes bounded and consistent) before it
allocates the destination buffers, which the transport then fills directly.

Torch is optional and never imported unless a torch tensor is sent or requested.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from lattice._lazy import lazy_module
from lattice.codec.buffers import recycled
from lattice.codec.packing import pack_plain
from lattice.codec.shapes import MAX_DIMS, checked_nbytes
from lattice.errors import PayloadError

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")  # plain-value messages never need it (lattice._lazy)

TENSOR_EXT = 1
MAX_TENSORS = 100_000
MAX_DEPTH = 64

# dtype name on the wire -> (numpy dtype that holds the bytes, bytes per element); plain names and
# ints so that checking a descriptor needs no numpy (bfloat16 travels as raw 2-byte words)
_DTYPES: dict[str, tuple[str, int]] = {
    "bool": ("bool", 1), "int8": ("int8", 1), "uint8": ("uint8", 1), "int16": ("int16", 2),
    "uint16": ("uint16", 2), "int32": ("int32", 4), "uint32": ("uint32", 4), "int64": ("int64", 8),
    "uint64": ("uint64", 8), "float16": ("float16", 2), "float32": ("float32", 4),
    "float64": ("float64", 8), "complex64": ("complex64", 8), "complex128": ("complex128", 16),
    "bfloat16": ("uint16", 2),
}  # fmt: skip


def itemsize(dtype: Any) -> int:
    """Bytes per element of a wire dtype name; PayloadError if it is not one we accept."""
    entry = _DTYPES.get(dtype) if isinstance(dtype, str) else None
    if entry is None:
        raise PayloadError(f"unsupported dtype {dtype!r}")
    return entry[1]


@dataclass
class TensorSpec:
    """A validated tensor descriptor from the wire; ``buffer`` is filled by the transport."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    origin: str  # "numpy" | "torch"
    codec: str | None
    meta: Any
    buffer: np.ndarray | None = None
    decoded: int = 0  # bytes of the decoded tensor if compressed (from ``meta``, validated)


def _is_torch(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and type(obj).__name__ in ("Tensor", "Parameter")


def _torch_dtype_name(t: Any) -> str:
    name = str(t.dtype).removeprefix("torch.")
    return {"bool": "bool"}.get(name, name)


def tensor_bytes(obj: Any) -> tuple[str, tuple[int, ...], memoryview, str]:
    """(dtype name, shape, contiguous byte view, origin) of a numpy array or torch tensor."""
    if _is_torch(obj):
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        dtype = _torch_dtype_name(t)
        if dtype not in _DTYPES:
            raise PayloadError(f"unsupported torch dtype {t.dtype}")
        t = t.contiguous()
        shape = tuple(t.shape)
        if dtype == "bfloat16":
            import torch

            arr = t.view(torch.int16).numpy()
        else:
            arr = t.numpy()
        return dtype, shape, memoryview(arr.reshape(-1)).cast("B"), "torch"
    arr = obj
    dtype = arr.dtype.name
    if dtype not in _DTYPES or arr.dtype.byteorder == ">":
        raise PayloadError(f"unsupported numpy dtype {arr.dtype}")
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return dtype, tuple(int(d) for d in arr.shape), memoryview(arr.reshape(-1)).cast("B"), "numpy"


def encode(value: Any, codec: str | None = None) -> tuple[bytes, list[memoryview]]:
    """Encode ``value``: (msgpack document, tensor buffers in order). ``codec`` compresses float tensors."""
    buffers: list[memoryview] = []

    def default(obj: Any) -> Any:  # only for what msgpack cannot pack itself: numpy is loaded here
        from lattice.codec import compression

        if isinstance(obj, compression.Compressed):
            return _compressed_ext(obj, buffers)
        if isinstance(obj, np.ndarray) or _is_torch(obj):
            if len(buffers) >= MAX_TENSORS:
                raise PayloadError(f"more than {MAX_TENSORS} tensors in one message")
            origin = "torch" if _is_torch(obj) else "numpy"
            if codec is not None:
                arr = obj if isinstance(obj, np.ndarray) else _torch_to_numpy(obj)
                if compression.applies(codec, arr):
                    return _compressed_ext(compression.compress(codec, arr, origin), buffers)
            dtype, shape, raw, _ = tensor_bytes(obj)
            buffers.append(raw)
            desc = [dtype, list(shape), raw.nbytes, origin, None, None]
            return msgpack.ExtType(TENSOR_EXT, msgpack.packb(desc, use_bin_type=True))
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, tuple):
            return list(obj)
        raise PayloadError(
            f"cannot send a {type(obj).__name__} (plain values, bytes, arrays and tensors only)"
        )

    try:
        try:
            return pack_plain(value), buffers  # plain values: no arrays, no tensors
        except TypeError:
            pass
        doc = msgpack.packb(value, default=default, use_bin_type=True, strict_types=False)
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, PayloadError):
            raise
        raise PayloadError(f"cannot encode value: {exc}") from None
    return doc, buffers


def _torch_to_numpy(obj: Any) -> np.ndarray:
    dtype, shape, raw, _ = tensor_bytes(obj)
    if dtype == "bfloat16":  # compress from float32 values
        words = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
        return words.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=_DTYPES[dtype][0]).reshape(shape)


def _compressed_ext(c: Any, buffers: list[memoryview]) -> msgpack.ExtType:
    data = np.ascontiguousarray(c.data)
    raw = data.reshape(-1).data.cast("B")
    buffers.append(raw)
    desc = [data.dtype.name, list(data.shape), raw.nbytes, c.origin, c.codec, c.meta]
    return msgpack.ExtType(TENSOR_EXT, msgpack.packb(desc, use_bin_type=True))


def parse(doc: bytes, max_payload: int) -> tuple[Any, list[TensorSpec]]:
    """Decode a document into a value with TensorSpec placeholders (validated, nothing allocated)."""
    specs: list[TensorSpec] = []

    def ext_hook(code: int, data: bytes) -> Any:
        if code != TENSOR_EXT:
            raise PayloadError(f"unknown msgpack extension type {code}")
        if len(specs) >= MAX_TENSORS:
            raise PayloadError("too many tensors")
        try:
            desc = msgpack.unpackb(
                data, raw=False, max_array_len=MAX_DIMS + 8, max_map_len=64, max_str_len=256
            )
        except Exception:
            raise PayloadError("malformed tensor descriptor") from None
        specs.append(_validate(desc, max_payload))
        return specs[-1]

    try:
        value = msgpack.unpackb(
            doc,
            raw=False,
            ext_hook=ext_hook,
            strict_map_key=False,
        )
    except PayloadError:
        raise
    except Exception as exc:
        raise PayloadError(f"malformed message document: {exc}") from None
    total = total_nbytes(specs)
    if total > max_payload:
        raise PayloadError(f"tensors total {total} bytes, over the limit of {max_payload}")
    return value, specs


def _validate(desc: Any, max_payload: int) -> TensorSpec:
    if not isinstance(desc, list) or len(desc) != 6:
        raise PayloadError("malformed tensor descriptor")
    dtype, shape, nbytes, origin, codec, meta = desc
    if dtype not in _DTYPES:
        raise PayloadError(f"unsupported dtype {dtype!r}")
    if not isinstance(nbytes, int) or nbytes < 0 or nbytes > max_payload:
        raise PayloadError("tensor byte size out of range")
    expected = checked_nbytes(shape, _DTYPES[dtype][1], max_payload)
    if expected != nbytes:
        raise PayloadError(f"tensor byte size {nbytes} does not match shape {shape} of {dtype}")
    if origin not in ("numpy", "torch"):
        raise PayloadError("tensor origin must be numpy or torch")
    decoded = 0
    if codec is not None:
        from lattice.codec import compression

        if not (isinstance(codec, str) and compression.known(codec)):
            raise PayloadError(f"unknown tensor codec {codec!r}")
        decoded = compression.decoded_nbytes(meta)  # bounded by the receiver before decoding
    return TensorSpec(dtype, tuple(shape), nbytes, origin, codec, meta, decoded=decoded)


def allocate(spec: TensorSpec) -> memoryview:
    """The destination buffer for a tensor's bytes (filled in place by the transport): :func:`recycled`."""
    spec.buffer = recycled(spec.nbytes)
    return spec.buffer.data


def finish(value: Any, as_torch: bool | None = None, max_bytes: int | None = None) -> Any:
    """Replace TensorSpec placeholders with arrays/tensors built on their (filled) buffers.

    ``max_bytes`` bounds what compressed tensors decode to, together (checked before decoding).
    """
    if not isinstance(value, list | dict | TensorSpec):
        return value  # a scalar, string or bytes: nothing to build (the small-call fast path)
    left = max_bytes

    def build(spec: TensorSpec) -> Any:
        nonlocal left
        assert spec.buffer is not None
        arr = spec.buffer.view(_DTYPES[spec.dtype][0]).reshape(spec.shape)
        dtype_name = spec.dtype
        if spec.codec is not None:
            from lattice.codec import compression

            if left is not None:
                if spec.decoded > left:
                    raise PayloadError(f"compressed tensors decode to more than {max_bytes} bytes")
                left -= spec.decoded
            arr, dtype_name = compression.decompress(spec.codec, arr, spec.meta, spec.decoded)
        want_torch = spec.origin == "torch" if as_torch is None else as_torch
        if want_torch:
            return _to_torch(arr, dtype_name)
        return arr

    return _map(value, lambda obj: build(obj) if isinstance(obj, TensorSpec) else obj)


def total_nbytes(items: Sequence[Any]) -> int:
    """Bytes of a message's buffers or tensor specs (``nbytes`` each; no generator for the empty
    list of a small call)."""
    return sum([item.nbytes for item in items]) if items else 0


def message_bytes(specs: list[TensorSpec]) -> int:
    """Memory a message's tensors take once received: payload bytes plus decoded compressed ones."""
    return sum([s.nbytes + s.decoded for s in specs])


def _to_torch(arr: np.ndarray, dtype_name: str) -> Any:
    try:
        import torch
    except ImportError:
        return arr  # torch not installed: numpy (bfloat16 stays as its raw uint16 words)
    if dtype_name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr) if arr.flags.writeable else torch.from_numpy(arr.copy())


def retype(value: Any, as_torch: bool) -> Any:
    """Convert every array/tensor in a decoded value to torch (True) or numpy (False)."""

    def convert(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return _to_torch(obj, obj.dtype.name) if as_torch else obj
        if _is_torch(obj) and not as_torch:
            return obj.numpy()
        return obj

    return _map(value, convert)


def _map(value: Any, leaf: Any, depth: int = 0) -> Any:
    """Apply ``leaf`` to every non-container in a decoded value (lists and maps, bounded depth)."""
    if depth > MAX_DEPTH:
        raise PayloadError("value nested too deeply")
    if isinstance(value, list):
        return [_map(x, leaf, depth + 1) for x in value]
    if isinstance(value, dict):
        return {k: _map(v, leaf, depth + 1) for k, v in value.items()}
    return leaf(value)
