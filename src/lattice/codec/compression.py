"""Tensor compression codecs, usable per call (``codec="fp16"``) and extensible (``register``).

Built in: ``fp16``, ``bf16``, ``int8`` (one scale per tensor), ``int8-block`` (one scale per 256
values), ``topk:RATIO`` (largest-magnitude fraction, indices + values). Top-k is lossy in a biased way;
wrap it in :class:`ErrorFeedback` so dropped mass is carried to the next round (as in
CDProxSGT/ChocoSGD). Decoding validates every field from the wire before allocating.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from lattice.codec import buffers
from lattice.codec.shapes import MAX_ARRAY_BYTES, checked_nbytes
from lattice.errors import PayloadError

_FLOATS = ("float16", "float32", "float64", "bfloat16")


@dataclass
class Compressed:
    """A tensor already compressed by a codec; the tensor codec sends it as is."""

    codec: str
    data: np.ndarray
    meta: Any
    origin: str = "numpy"


class Codec(Protocol):
    def encode(self, arr: np.ndarray, param: float | None) -> tuple[np.ndarray, dict]: ...
    def decode(self, data: np.ndarray, meta: dict, shape: tuple[int, ...]) -> np.ndarray: ...


_REGISTRY: dict[str, Codec] = {}


def register(name: str, codec: Codec) -> None:
    """Add a codec under ``name`` (callers use ``name`` or ``name:param``)."""
    if not name or ":" in name:
        raise ValueError("codec names are non-empty and contain no ':'")
    _REGISTRY[name] = codec


def _split(spec: str) -> tuple[str, float | None]:
    name, _, param = spec.partition(":")
    if name not in _REGISTRY:
        raise PayloadError(f"unknown codec {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    if not param:
        return name, None
    try:
        value = float(param)
    except ValueError:
        raise PayloadError(f"codec parameter {param!r} is not a number") from None
    if not math.isfinite(value):
        raise PayloadError("codec parameter must be finite")
    return name, value


def known(spec: str) -> bool:
    try:
        _split(spec)
    except PayloadError:
        return False
    return True


def applies(spec: str, arr: np.ndarray) -> bool:
    _split(spec)
    return arr.dtype.name in _FLOATS and arr.size > 0


def compress(spec: str, arr: np.ndarray, origin: str = "numpy") -> Compressed:
    name, param = _split(spec)
    data, meta = _REGISTRY[name].encode(np.ascontiguousarray(arr), param)
    meta = {"shape": list(arr.shape), "dtype": arr.dtype.name, **meta}
    return Compressed(spec, data, meta, origin)


def decoded_nbytes(meta: Any, limit: int = MAX_ARRAY_BYTES) -> int:
    """Bytes a compressed tensor decodes to, from its (untrusted) metadata; PayloadError if the
    metadata is malformed or the result would be over ``limit``."""
    if not isinstance(meta, dict):
        raise PayloadError("codec metadata must be a map")
    dtype = meta.get("dtype")
    if dtype not in ("float16", "float32", "float64"):
        raise PayloadError("codec metadata has an invalid dtype")
    try:
        return checked_nbytes(meta.get("shape"), np.dtype(dtype).itemsize, limit)
    except PayloadError as exc:
        raise PayloadError(f"codec metadata has an invalid shape: {exc}") from None


def decompress(spec: str, data: np.ndarray, meta: Any, max_elements: int) -> tuple[np.ndarray, str]:
    """(decoded array, dtype name) from wire data; raises PayloadError on any inconsistency."""
    name, _ = _split(spec)
    decoded_nbytes(meta)
    shape, dtype = meta["shape"], meta["dtype"]
    if math.prod(shape) > max_elements:
        raise PayloadError("codec metadata has an invalid shape")
    try:
        out = _REGISTRY[name].decode(data, meta, tuple(shape))
        return np.asarray(out).astype(dtype, copy=False).reshape(shape), dtype  # 0-d stays an array
    except PayloadError:
        raise
    except (ValueError, TypeError, IndexError, OverflowError) as exc:  # a codec's own checks missed it
        raise PayloadError(f"codec {name}: cannot decode: {exc}") from None


def compress_decompress(spec: str, arr: np.ndarray) -> np.ndarray:
    """What the receiver will see (used by error feedback and tests)."""
    c = compress(spec, arr)
    out, _ = decompress(spec, c.data, c.meta, arr.size)
    return out


class ErrorFeedback:
    """Carries what compression dropped into the next message of the same key (per sender)."""

    def __init__(self, codec: str) -> None:
        _split(codec)
        self.codec = codec
        self.residual: dict[Any, np.ndarray] = {}

    def compress(self, key: Any, arr: np.ndarray) -> Compressed:
        corrected = arr.astype(np.float32) + self.residual.get(key, 0.0)
        c = compress(self.codec, corrected)
        sent, _ = decompress(self.codec, c.data, c.meta, corrected.size)
        self.residual[key] = corrected - sent
        return c


# -- built-in codecs
def cast(src: np.ndarray, dtype: Any) -> np.ndarray:
    """``src.astype(dtype)`` into a new array (recycled when large: ``buffers.recycled``), between
    float16 and float32 through torch when the process has already loaded it: its casts are
    vectorized (4M values: ~1 ms, numpy's 8-14 ms, what made fp16 no faster than float32 on fast
    links); both round to nearest even, so the values are the same."""
    dtype = np.dtype(dtype)
    if src.dtype == dtype or src.nbytes < buffers.ALIGN_FROM:
        return src.astype(dtype)
    out = buffers.recycled(src.size * dtype.itemsize).view(dtype).reshape(src.shape)
    torch = sys.modules.get("torch")
    halves = {src.dtype.name, dtype.name} == {"float16", "float32"}
    if torch is not None and halves and src.flags.c_contiguous and src.flags.writeable:
        torch.from_numpy(out).copy_(torch.from_numpy(src))
    else:
        np.copyto(out, src, casting="unsafe")
    return out


class _FP16:
    def encode(self, arr, param):
        return cast(arr, np.float16), {}

    def decode(self, data, meta, shape):
        _expect(data, np.float16, math.prod(shape))
        return cast(data, np.float32)


class _BF16:
    def encode(self, arr, param):
        words = arr.astype(np.float32).reshape(-1).view(np.uint32)
        rounded = (words + 0x7FFF + ((words >> 16) & 1)) >> 16  # round to nearest even
        return rounded.astype(np.uint16), {}

    def decode(self, data, meta, shape):
        _expect(data, np.uint16, math.prod(shape))
        return (data.astype(np.uint32) << 16).view(np.float32)


class _Int8:
    def encode(self, arr, param):
        flat = arr.astype(np.float32).reshape(-1)
        peak = float(np.max(np.abs(flat))) if flat.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        return np.clip(np.rint(flat / scale), -127, 127).astype(np.int8), {"scale": scale}

    def decode(self, data, meta, shape):
        _expect(data, np.int8, math.prod(shape))
        scale = meta.get("scale")
        if not isinstance(scale, float) or not math.isfinite(scale):
            raise PayloadError("int8 codec: invalid scale")
        return data.astype(np.float32) * scale


class _Int8Block:
    """Blockwise int8: [float32 scales][int8 values], one scale per ``block`` values."""

    def encode(self, arr, param):
        block = int(param) if param else 256
        if not 8 <= block <= 1 << 16:
            raise PayloadError("int8-block: block size must be in [8, 65536]")
        flat = arr.astype(np.float32).reshape(-1)
        n = flat.size
        padded = np.zeros(-(-n // block) * block, dtype=np.float32)
        padded[:n] = flat
        blocks = padded.reshape(-1, block)
        peaks = np.max(np.abs(blocks), axis=1)
        scales = np.where(peaks > 0, peaks / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(blocks / scales[:, None]), -127, 127).astype(np.int8)
        data = np.concatenate([scales.view(np.uint8), q.reshape(-1).view(np.uint8)])
        return data, {"block": block}

    def decode(self, data, meta, shape):
        n = math.prod(shape)
        block = meta.get("block")
        if not isinstance(block, int) or not 8 <= block <= 1 << 16:
            raise PayloadError("int8-block: invalid block size")
        nblocks = -(-n // block)
        _expect(data, np.uint8, nblocks * 4 + nblocks * block)
        scales = data[: nblocks * 4].view(np.float32)
        q = data[nblocks * 4 :].view(np.int8).reshape(nblocks, block)
        return (q.astype(np.float32) * scales[:, None]).reshape(-1)[:n]


class _TopK:
    """Top-k by magnitude: [uint32 indices][float32 values]; ``topk:0.01`` keeps 1 %."""

    def encode(self, arr, param):
        ratio = param if param is not None else 0.01
        if not 0 < ratio <= 1:
            raise PayloadError("topk ratio must be in (0, 1]")
        flat = arr.astype(np.float32).reshape(-1)
        if flat.size >= 1 << 32:
            raise PayloadError("topk supports tensors of fewer than 2**32 elements")
        k = max(1, round(flat.size * ratio))
        idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :].astype(np.uint32)
        idx.sort()
        data = np.concatenate([idx.view(np.uint8), flat[idx].view(np.uint8)])
        return data, {"k": k}

    def decode(self, data, meta, shape):
        n = math.prod(shape)
        k = meta.get("k")
        if not isinstance(k, int) or not 0 < k <= max(n, 1):
            raise PayloadError("topk: invalid k")
        _expect(data, np.uint8, 8 * k)
        idx = data[: 4 * k].view(np.uint32)
        if idx.size and int(idx.max()) >= n:
            raise PayloadError("topk: index out of range")
        out = np.zeros(n, dtype=np.float32)
        out[idx] = data[4 * k :].view(np.float32)
        return out


def _expect(data: np.ndarray, dtype: Any, count: int) -> None:
    if data.dtype != np.dtype(dtype) or data.size != count:
        raise PayloadError(
            f"compressed data has {data.size} x {data.dtype}, expected {count} x {np.dtype(dtype)}"
        )


register("fp16", _FP16())
register("bf16", _BF16())
register("int8", _Int8())
register("int8-block", _Int8Block())
register("topk", _TopK())
