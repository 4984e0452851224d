"""GGUF loading on a tiny LLaMA file written here: config, per-stage tensors, the .npy cache, tokenizer."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

from lattice.apps.mesh_inference.model import Stage, random_weights, tiny_config  # noqa: E402
from lattice.apps.mesh_inference.tokenizer import byte_symbols  # noqa: E402
from lattice.apps.mesh_inference.weights import gguf_config, load_gguf_tensors, open_model  # noqa: E402

CONFIG = tiny_config(vocab_size=258, max_positions=256)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_gguf(path, weights, quantize=()):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(CONFIG.n_layers)
    w.add_embedding_length(CONFIG.hidden)
    w.add_head_count(CONFIG.n_heads)
    w.add_head_count_kv(CONFIG.n_kv_heads)
    w.add_feed_forward_length(CONFIG.ffn)
    w.add_rope_freq_base(CONFIG.rope_theta)
    w.add_layer_norm_rms_eps(CONFIG.norm_eps)
    w.add_context_length(CONFIG.max_positions)
    w.add_vocab_size(CONFIG.vocab_size)
    # byte-level BPE: the 256 byte symbols, one merge ("a" + "b"), and a control token
    byte_syms = byte_symbols()
    w.add_tokenizer_model("gpt2")
    w.add_token_list([*byte_syms, "ab", "<|im_end|>"])
    w.add_token_merges(["a b"])
    w.add_token_types([1] * 257 + [3])
    for name, t in sorted(weights.items()):
        arr = t.numpy()
        if name in quantize:
            w.add_tensor(name, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_stage_equals_the_same_weights_in_memory(tmp_path):
    weights = random_weights(CONFIG, seed=3)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, weights)
    config = gguf_config(path)
    assert config.n_layers == 6 and config.n_kv_heads == 2 and config.tied
    assert config.rope_layout == "interleaved" and config.vocab_size == 258
    names = config.stage_tensor_names(2, 4)
    loaded = load_gguf_tensors(path, names, {n: tuple(weights[n].shape) for n in names})
    assert set(loaded) == set(names)  # only the stage's blocks
    assert all(torch.equal(loaded[n], weights[n]) for n in names)
    tokens = torch.tensor([[1, 2, 3, 4]])
    full = load_gguf_tensors(
        path, CONFIG.stage_tensor_names(0, 6), {n: tuple(t.shape) for n, t in weights.items()}
    )
    assert torch.equal(
        Stage(config, full, 0, 6).forward(tokens), Stage(CONFIG, weights, 0, 6).forward(tokens)
    )


def test_quantized_tensors_are_dequantized_and_cached_as_npy(tmp_path):
    weights = random_weights(CONFIG, seed=4)
    path = tmp_path / "q8.gguf"
    write_gguf(path, weights, quantize={"blk.0.ffn_up.weight"})
    shapes = {n: tuple(t.shape) for n, t in weights.items()}
    cache = tmp_path / "cache"
    first = load_gguf_tensors(path, ["blk.0.ffn_up.weight", "blk.0.attn_norm.weight"], shapes, cache)
    q = first["blk.0.ffn_up.weight"]
    assert q.dtype == torch.float32 and q.shape == weights["blk.0.ffn_up.weight"].shape
    assert not torch.equal(q, weights["blk.0.ffn_up.weight"])  # Q8_0 is lossy ...
    assert torch.allclose(q, weights["blk.0.ffn_up.weight"], atol=0.02)  # ... but close
    files = sorted(p.name for p in cache.rglob("*.npy"))
    assert files == ["blk.0.attn_norm.weight.npy", "blk.0.ffn_up.weight.npy"]
    again = load_gguf_tensors(path, ["blk.0.ffn_up.weight"], shapes, cache)  # from the cache
    assert torch.equal(again["blk.0.ffn_up.weight"], q)


def test_tokenizer_from_gguf_and_model_specs(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, random_weights(CONFIG, seed=5))
    source = open_model(str(path))
    assert source.model_id == "tiny" and source.config.n_layers == 6
    tok = source.tokenizer()
    ids = tok.encode("ab cab 12").ids
    assert 256 in ids  # the merge "a b" applied
    assert tok.decode(ids) == "ab cab 12"
    assert tok.token_to_id("<|im_end|>") == 257
    assert open_model("tiny-random:7").model_id == "tiny-random-7"
    from lattice.errors import ConfigError

    with pytest.raises(ConfigError):
        open_model(str(tmp_path / "missing.gguf"))
