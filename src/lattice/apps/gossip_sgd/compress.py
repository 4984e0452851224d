"""The RPC codecs (lattice.codec.compression) applied to rows of a torch tensor, and their wire size.

The network transport sends through the codecs themselves; the simulator applies the same lossy
transform here, vectorized over peers (tests check it equals ``compress_decompress`` exactly), and
counts the bytes the wire would carry, taken from the encoder's own output size.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from lattice.codec import compression, tensors


def check(spec: str | None) -> None:
    if spec is not None and not compression.known(spec):
        raise ValueError(f"unknown codec {spec!r}")


@functools.lru_cache(maxsize=256)
def wire_bytes(spec: str | None, numel: int) -> int:
    """Bytes one message of ``numel`` float32 values costs on the wire (tensor part, encoded)."""
    sample = np.random.default_rng(0).standard_normal(numel).astype(np.float32)
    head, buffers = tensors.encode({"t": sample}, spec)
    return len(head) + sum(b.nbytes for b in buffers)


def lossy(spec: str | None, rows: Tensor) -> Tensor:
    """What a receiver decodes for each row of ``rows`` [n, d] sent with codec ``spec``."""
    if spec is None:
        return rows
    name, _, param = spec.partition(":")
    rows = rows.float()
    if name == "fp16":
        return rows.half().float()
    if name == "bf16":
        return rows.bfloat16().float()
    if name == "int8":
        peak = rows.abs().amax(dim=1, keepdim=True)
        scale = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
        return torch.clamp(torch.round(rows / scale), -127, 127) * scale
    if name == "topk":
        ratio = float(param) if param else 0.01
        k = max(1, round(rows.shape[1] * ratio))
        idx = rows.abs().topk(k, dim=1, sorted=False).indices
        return torch.zeros_like(rows).scatter_(1, idx, rows.gather(1, idx))
    # any other registered codec: through the codec itself, row by row
    return torch.stack(
        [torch.from_numpy(compression.compress_decompress(spec, r.numpy())) for r in rows.detach()]
    )
