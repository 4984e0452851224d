"""LLaMA-family hyper-parameters and tensor names (no torch: the CLI validates arguments without it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ROPE_LAYOUTS = ("interleaved", "half")  # GGML q/k layout (pairs 2i, 2i+1) / HF rotate-half (i, i+d/2)
ATTN_BLOCK = 256  # positions per block of attention's weighted sum (model._attention): part of the numerics
# smallest prefill chunk: its pieces have >= 32 rows; shorter ones (softmax rows under the SIMD width,
# matrix-vector kernels) change BLAS's summation order, and chunked prompts would not be bitwise equal
MIN_CHUNK = 64
# linear layers get at least this many rows (zero rows pad a decode step): MKL's sgemm gives each row
# bitwise the same result for any row count >= 4 (1-3 rows take other kernels; checked by
# tests/test_mesh_model.py on this build), so a session's step is the same alone or in a batch
ROW_PAD = 4
ARCHS = ("llama", "qwen2")  # qwen2: biases on q/k/v, GGUF keeps HF's rotate-half q/k layout
DTYPES = ("float32", "bfloat16", "float16")  # what a stage's linear layers compute in


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tied: bool = True
    rope_layout: str = "interleaved"
    max_positions: int = 2048
    head_dim: int = field(default=0)
    arch: str = "llama"
    qkv_bias: bool = False  # q, k and v projections have biases (Qwen2)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden // self.n_heads)
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError("n_heads must be a multiple of n_kv_heads")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> LlamaConfig:
        """A config a remote server sent: known fields only, each of the right type and in range
        (``MAX_DIM``), so a client never allocates from a hostile number."""
        if not isinstance(d, dict) or not set(d) <= set(cls.__dataclass_fields__):
            raise ValueError("a model config is a map of known fields")
        ints = ("vocab_size", "hidden", "n_layers", "n_heads", "n_kv_heads", "ffn", "max_positions",
                "head_dim")  # fmt: skip
        for name in ints:
            if name in d and (type(d[name]) is not int or not 1 <= d[name] <= MAX_DIM):
                raise ValueError(f"config field {name} must be an integer in 1..{MAX_DIM}")
        for name in ("rope_theta", "norm_eps"):
            if name in d and (type(d[name]) not in (int, float) or not 0 < d[name] < 1e12):
                raise ValueError(f"config field {name} must be a positive number")
        for name in ("tied", "qkv_bias"):
            if name in d and type(d[name]) is not bool:
                raise ValueError(f"config field {name} must be a boolean")
        try:
            return cls(**d)
        except TypeError as exc:
            raise ValueError(f"bad model config: {exc}") from None

    def kv_bytes_per_token(self, n_blocks: int) -> int:
        """fp32 K and V for one token over ``n_blocks`` blocks (what a session's cache grows by)."""
        return 2 * n_blocks * self.n_kv_heads * self.head_dim * 4

    def step_bytes(self, rows: int, context: int, logits: bool) -> int:
        """Upper estimate of the transient fp32 memory of one forward of ``rows`` new positions
        attending to ``context`` positions, blocks run one after another, plus the LM head if
        ``logits``: scores and probabilities are heads x rows x context each, which is why a long
        prompt is computed in chunks of rows (a 8,192-token prompt in one piece needs GiBs)."""
        heads, f = self.n_heads, 4
        attention = 2 * heads * rows * context * f + heads * rows * ATTN_BLOCK * f + 2 * rows * context
        kv_copies = 2 * (heads + self.n_kv_heads) * context * self.head_dim * f  # repeated k/v, cache cat
        activations = rows * (4 * self.hidden + 3 * heads * self.head_dim + 3 * self.ffn) * f
        return attention + kv_copies + activations + (rows * self.vocab_size * f if logits else 0)

    def block_tensor_names(self, i: int) -> list[str]:
        names = [f"blk.{i}.{n}.weight" for n in BLOCK_TENSORS]
        if self.qkv_bias:
            names += [f"blk.{i}.{n}.bias" for n in ("attn_q", "attn_k", "attn_v")]
        return names

    def stage_tensor_names(self, start: int, end: int) -> list[str]:
        """Tensors a stage holding blocks [start, end) needs (embedding first, norm + head last)."""
        names = []
        if start == 0 or (end == self.n_layers and self.tied):
            names.append("token_embd.weight")
        for i in range(start, end):
            names += self.block_tensor_names(i)
        if end == self.n_layers:
            names.append("output_norm.weight")
            if not self.tied:
                names.append("output.weight")
        return names


MAX_DIM = 1 << 22  # largest size a remote model config may name (vocabularies are ~150k)

BLOCK_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
                 "ffn_up", "ffn_down")  # fmt: skip


def tiny_config(**overrides) -> LlamaConfig:
    """A tiny LLaMA for tests: 6 blocks, GQA 4/2 heads, vocab 256, SmolLM2's 8,192 positions (so
    tests can send the long prompts a real model accepts)."""
    base: dict[str, Any] = dict(vocab_size=256, hidden=64, n_layers=6, n_heads=4, n_kv_heads=2, ffn=128,
                                rope_theta=10000.0, max_positions=8192)  # fmt: skip
    base.update(overrides)
    return LlamaConfig(**base)


def _shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    d, kv = c.head_dim, c.n_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (c.vocab_size, c.hidden),
                                          "output_norm.weight": (c.hidden,)}  # fmt: skip
    if not c.tied:
        shapes["output.weight"] = (c.vocab_size, c.hidden)
    for i in range(c.n_layers):
        p = f"blk.{i}."
        shapes |= {p + "attn_norm.weight": (c.hidden,), p + "attn_q.weight": (c.n_heads * d, c.hidden),
                   p + "attn_k.weight": (kv, c.hidden), p + "attn_v.weight": (kv, c.hidden),
                   p + "attn_output.weight": (c.hidden, c.n_heads * d), p + "ffn_norm.weight": (c.hidden,),
                   p + "ffn_gate.weight": (c.ffn, c.hidden), p + "ffn_up.weight": (c.ffn, c.hidden),
                   p + "ffn_down.weight": (c.hidden, c.ffn)}  # fmt: skip
        if c.qkv_bias:
            shapes |= {
                p + "attn_q.bias": (c.n_heads * d,),
                p + "attn_k.bias": (kv,),
                p + "attn_v.bias": (kv,),
            }
    return shapes


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    return _shapes(config)
