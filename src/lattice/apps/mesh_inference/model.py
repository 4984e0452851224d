"""A small pure-torch LLaMA, split into stages: each stage runs a contiguous range of blocks.

Own code rather than transformers so that a stage loads only its blocks, the same ops run in one
process or split across peers (bitwise-equal fp32 logits), and nothing chases library internals.
Weights use GGUF tensor names (``token_embd``, ``blk.N.attn_q`` ...), whatever their source.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lattice.apps.mesh_inference.config import (  # noqa: F401  (re-exported)
    ATTN_BLOCK,
    BLOCK_TENSORS,
    DTYPES,
    ROPE_LAYOUTS,
    ROW_PAD,
    LlamaConfig,
    expected_shapes,
    tiny_config,
)
from lattice.apps.mesh_inference.sampling import Sampler, Sampling


def random_weights(
    config: LlamaConfig, seed: int = 0, names: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Deterministic random weights (the same ``seed`` gives the same tensors in every process)."""
    shapes = expected_shapes(config)
    out = {}
    for idx, (name, shape) in enumerate(sorted(shapes.items())):
        if names is not None and name not in names:
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + idx)
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            out[name] = torch.randn(shape, generator=gen) * (1.0 / math.sqrt(shape[-1]))
    return out


class KVCache:
    """Per-session keys and values of the blocks a stage runs: ``layers[i] = (k, v)``, [B, kv, T, d]."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.length = 0

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers.values())


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class Rope:
    """cos/sin tables for every position, and the rotation in either layout."""

    def __init__(self, config: LlamaConfig) -> None:
        d = config.head_dim
        inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angles = torch.outer(torch.arange(config.max_positions, dtype=torch.float64), inv)
        self.cos = angles.cos().to(torch.float32)  # [P, d/2]
        self.sin = angles.sin().to(torch.float32)
        self.layout = config.rope_layout

    def apply(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """Rotate x [B, heads, T, d] for positions pos .. pos+T-1."""
        t = x.shape[2]
        cos, sin = self.cos[pos : pos + t], self.sin[pos : pos + t]
        if self.layout == "interleaved":
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Stage:
    """Blocks [start, end) of a LLaMA; the first stage embeds tokens, the last returns logits.

    ``dtype`` is what the weights are kept and the linear layers computed in (bfloat16 / float16
    halve the memory); norms, RoPE, attention, the KV cache and the residual stream stay fp32."""

    def __init__(
        self,
        config: LlamaConfig,
        weights: dict[str, torch.Tensor],
        start: int,
        end: int,
        dtype: str = "float32",
    ) -> None:
        if not 0 <= start < end <= config.n_layers:
            raise ValueError(f"bad block range {start}:{end} for {config.n_layers} blocks")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}")
        missing = [n for n in config.stage_tensor_names(start, end) if n not in weights]
        if missing:
            raise ValueError(f"weights missing: {', '.join(missing[:4])}")
        self.config, self.start, self.end = config, start, end
        self.dtype_name, self.dtype = dtype, getattr(torch, dtype)
        self.w = {n: _stored(n, weights[n], self.dtype) for n in config.stage_tensor_names(start, end)}
        self.rope = Rope(config)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        start: int | None = None,
        end: int | None = None,
        head: bool = True,
    ) -> torch.Tensor:
        """Run blocks [start, end) (default: all of this stage's) on x; appends to ``cache``.

        x: token ids [B, T] (int64) when start == 0, else hidden states [B, T, hidden] (fp32).
        Returns hidden states, or logits [B, T, vocab] when end is the model's last block and
        ``head`` (False skips the final norm and LM head: a prompt chunk whose logits nobody reads).
        A batch of one session: :meth:`forward_batch` computes it, so it is bitwise what a step in a
        batch of sessions gives."""
        if x.shape[0] != 1:
            if cache is not None:
                raise ValueError("a cache holds one sequence: give x as [1, T]")
            return torch.cat([self.forward(x[i : i + 1], None, start, end, head) for i in range(x.shape[0])])
        return self.forward_batch([x], [cache], start, end, [head])[0]

    @torch.inference_mode()
    def forward_batch(
        self,
        xs: list[torch.Tensor],
        caches: list[KVCache | None],
        start: int | None = None,
        end: int | None = None,
        heads: list[bool] | None = None,
    ) -> list[torch.Tensor]:
        """One step of several sessions (each its x [1, T_i], its cache, its head flag) through
        blocks [start, end): the linear layers run once over all rows, attention per session
        (each over its own cache). Every row's result is the same as in a step of its own."""
        c = self.config
        start = self.start if start is None else start
        end = self.end if end is None else end
        heads = [True] * len(xs) if heads is None else heads
        if not self.start <= start < end <= self.end:
            raise ValueError(f"blocks {start}:{end} are outside this stage's {self.start}:{self.end}")
        kv = [cache if cache is not None else KVCache() for cache in caches]
        sizes = [x.shape[1] for x in xs]
        positions = [cache.length for cache in kv]
        if any(p + t > c.max_positions for p, t in zip(positions, sizes, strict=True)):
            raise ValueError(f"sequence longer than {c.max_positions} positions")
        rows = torch.cat([x[0] for x in xs])  # [R] token ids or [R, hidden]
        h = F.embedding(rows, self.w["token_embd.weight"]).float() if start == 0 else rows
        for i in range(start, end):
            h = self._block(i, h, sizes, kv, positions)
        for cache, p, t in zip(kv, positions, sizes, strict=True):
            cache.length = p + t
        parts = list(h.split(sizes))
        if end == c.n_layers:
            wanted = [j for j, head in enumerate(heads) if head]
            if wanted:
                hh = _rms_norm(
                    torch.cat([parts[j] for j in wanted]), self.w["output_norm.weight"], c.norm_eps
                )
                logits = _linear(hh, self.w["token_embd.weight" if c.tied else "output.weight"])
                for j, part in zip(wanted, logits.split([sizes[j] for j in wanted]), strict=True):
                    parts[j] = part
        return [part.unsqueeze(0) for part in parts]

    def _block(
        self, i: int, h: torch.Tensor, sizes: list[int], caches: list[KVCache], positions: list[int]
    ) -> torch.Tensor:
        """Block i on the rows h [R, hidden] of several sessions (``sizes`` rows each, in order)."""
        c, w, p = self.config, self.w, f"blk.{i}."
        x = _rms_norm(h, w[p + "attn_norm.weight"], c.norm_eps)
        q = _linear(x, w[p + "attn_q.weight"], w.get(p + "attn_q.bias"))
        k = _linear(x, w[p + "attn_k.weight"], w.get(p + "attn_k.bias"))
        v = _linear(x, w[p + "attn_v.weight"], w.get(p + "attn_v.bias"))
        outs = []
        for qs, ks, vs, cache, pos in zip(q.split(sizes), k.split(sizes), v.split(sizes), caches, positions,
                                          strict=True):  # fmt: skip
            outs.append(self._attend(i, qs, ks, vs, cache, pos))
        attn = outs[0] if len(outs) == 1 else torch.cat(outs)
        h = h + _linear(attn, w[p + "attn_output.weight"])
        x = _rms_norm(h, w[p + "ffn_norm.weight"], c.norm_eps)
        mlp = F.silu(_linear(x, w[p + "ffn_gate.weight"])) * _linear(x, w[p + "ffn_up.weight"])
        return h + _linear(mlp, w[p + "ffn_down.weight"])

    def _attend(
        self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, pos: int
    ) -> torch.Tensor:
        """One session's attention: its t rows of q/k/v -> [t, heads * d], with its cache."""
        c = self.config
        t = q.shape[0]
        q = q.view(1, t, c.n_heads, c.head_dim).transpose(1, 2)
        k = k.view(1, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(1, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q, k = self.rope.apply(q, pos), self.rope.apply(k, pos)
        if i in cache.layers:
            old_k, old_v = cache.layers[i]
            k, v = torch.cat((old_k, k), dim=2), torch.cat((old_v, v), dim=2)
        cache.layers[i] = (k, v)
        group = c.n_heads // c.n_kv_heads
        kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return _attention(q, kk, vv, c.head_dim).transpose(1, 2).reshape(t, -1)


def _stored(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Matrices in the compute dtype; norm weights and biases (vectors) stay fp32."""
    keep = dtype if tensor.dim() == 2 else torch.float32
    return tensor.to(keep).contiguous()


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [R, in] @ weight.T (+ bias) in the weight's dtype, returned as fp32. In fp32, fewer than
    ROW_PAD rows are padded with zero rows: MKL's kernels for 1-3 rows sum in another order, and a
    session's step must not depend on how many others share it. (oneDNN's bf16/fp16 kernels give
    every row the same result at any row count: nothing to pad.)"""
    rows = x.shape[0]
    pad = ROW_PAD - rows if weight.dtype == torch.float32 else 0
    if pad > 0:
        x = F.pad(x, (0, 0, 0, pad))
    y = F.linear(x.to(weight.dtype), weight)
    if pad > 0:
        y = y[:rows]
    y = y.float()
    return y + bias if bias is not None else y


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Causal attention of q's t new positions over all k/v positions, [B, heads, t, d].

    For t > 1 the weighted sum over positions runs in blocks of ATTN_BLOCK, the last one
    zero-padded, accumulated in order: every matmul then has the same inner size however long
    the context is, so a prompt computed in chunks against the cache gives bitwise the same
    result as in one piece (BLAS picks its reduction order from the inner size). One row (a
    decode step) takes the plain product: it is not bitwise comparable anyway (BLAS uses a
    matrix-vector kernel for one row)."""
    t, total = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(head_dim))
    if t == 1:
        return torch.softmax(scores, dim=-1) @ v
    mask = torch.ones(t, total, dtype=torch.bool).tril(total - t)  # earlier positions are all visible
    p = torch.softmax(scores.masked_fill_(~mask, float("-inf")), dim=-1)
    del scores, mask
    out = None
    for a in range(0, total, ATTN_BLOCK):
        b = min(a + ATTN_BLOCK, total)
        pb, vb = p[..., a:b], v[..., a:b, :]
        if b - a < ATTN_BLOCK:
            pb, vb = F.pad(pb, (0, ATTN_BLOCK - (b - a))), F.pad(vb, (0, 0, 0, ATTN_BLOCK - (b - a)))
        part = pb @ vb
        out = part if out is None else out + part
    assert out is not None
    return out


def chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    """Split n positions into pieces of at most ``chunk``, as even as possible: no piece is a
    short remainder (each has at least chunk/2 rows), so BLAS uses the same kernels for all."""
    if n <= chunk:
        return [(0, n)]
    pieces = -(-n // chunk)
    base, extra = divmod(n, pieces)
    bounds, a = [], 0
    for i in range(pieces):
        b = a + base + (i < extra)
        bounds.append((a, b))
        a = b
    return bounds


def split_evenly(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous block ranges of (nearly) equal size."""
    bounds = [round(i * n_layers / n_stages) for i in range(n_stages + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n_stages)]


def generate_local(
    stages: list[Stage], prompt: list[int], max_new_tokens: int, sampling: Sampling | None = None
) -> list[int]:
    """Decoding through in-process stages with KV caches (the reference for the mesh): greedy, or
    ``sampling``'s; the same seed gives the same tokens here and through the mesh."""
    caches = [KVCache() for _ in stages]
    sampler = Sampler(sampling or Sampling(), prompt)
    x: torch.Tensor = torch.tensor([prompt], dtype=torch.int64)
    out: list[int] = []
    for _ in range(max_new_tokens):
        h = x
        for stage, cache in zip(stages, caches, strict=True):
            h = stage.forward(h, cache)
        token = sampler(h[0, -1])
        out.append(token)
        x = torch.tensor([[token]], dtype=torch.int64)
    return out


def greedy_generate(stages: list[Stage], prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding through in-process stages (:func:`generate_local` without sampling)."""
    return generate_local(stages, prompt, max_new_tokens)
