"""Qwen2 GGUF files: config, q/k/v biases, rotate-half RoPE and the Qwen2 pre-tokenizer, checked
against a hand-written reference, against logits transformers 5.25 computed from the same file
(tests/data/qwen2_transformers_logits.json) and, where transformers is installed, against it live.

The file is written here (a tiny random Qwen2 in GGUF names, as llama.cpp's converter writes one:
q/k not permuted, biases as F32 tensors), so the test needs no download.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

import torch.nn.functional as F  # noqa: E402

from lattice.apps.mesh_inference.config import LlamaConfig  # noqa: E402
from lattice.apps.mesh_inference.model import KVCache, Stage, random_weights  # noqa: E402
from lattice.apps.mesh_inference.tokenizer import byte_symbols  # noqa: E402
from lattice.apps.mesh_inference.weights import gguf_config, open_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = LlamaConfig(vocab_size=300, hidden=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn=128,
                     rope_theta=1e6, norm_eps=1e-6, tied=False, rope_layout="half", max_positions=512,
                     arch="qwen2", qkv_bias=True)  # fmt: skip
SEED = 11
PROMPT = torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(3))
REFERENCE = Path(__file__).parent / "data" / "qwen2_transformers_logits.json"
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tokens() -> list[str]:
    extra = ["Ġt", "he", "Ġthe", "in", "Ġa"]
    pad = [f"<unused{i}>" for i in range(CONFIG.vocab_size - 256 - len(extra) - len(SPECIAL))]
    return byte_symbols() + extra + pad + SPECIAL


def write_qwen2_gguf(path: Path, config: LlamaConfig = CONFIG, seed: int = SEED) -> dict:
    """A Qwen2 GGUF file of random weights; returns the weights (fp32 torch)."""
    weights = random_weights(config, seed)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(config.n_layers)
    w.add_embedding_length(config.hidden)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_feed_forward_length(config.ffn)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_context_length(config.max_positions)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens())
    w.add_token_merges(MERGES)
    w.add_token_types([1] * (config.vocab_size - len(SPECIAL)) + [3] * len(SPECIAL))
    w.add_eos_token_id(config.vocab_size - 3)
    for name, t in sorted(weights.items()):
        w.add_tensor(name, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def reference_logits(w: dict, ids: torch.Tensor, c: LlamaConfig = CONFIG) -> torch.Tensor:
    """Qwen2 written out as transformers' modeling_qwen2 does it (fp64, no cache): RMSNorm,
    biased q/k/v, rotate-half RoPE, grouped-query causal attention, SwiGLU, untied head."""
    d = c.head_dim
    w = {k: v.double() for k, v in w.items()}

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps) * weight

    def rotate_half(x):
        return torch.cat((-x[..., d // 2 :], x[..., : d // 2]), dim=-1)

    t = ids.shape[1]
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = torch.outer(torch.arange(t, dtype=torch.float64), inv)
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    h = w["token_embd.weight"][ids[0]]
    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(c.n_layers):
        p = f"blk.{i}."
        x = norm(h, w[p + "attn_norm.weight"])
        q = (x @ w[p + "attn_q.weight"].T + w[p + "attn_q.bias"]).view(t, c.n_heads, d).transpose(0, 1)
        k = (x @ w[p + "attn_k.weight"].T + w[p + "attn_k.bias"]).view(t, c.n_kv_heads, d).transpose(0, 1)
        v = (x @ w[p + "attn_v.weight"].T + w[p + "attn_v.bias"]).view(t, c.n_kv_heads, d).transpose(0, 1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        rep = c.n_heads // c.n_kv_heads
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, dim=-1) @ v
        h = h + att.transpose(0, 1).reshape(t, -1) @ w[p + "attn_output.weight"].T
        x = norm(h, w[p + "ffn_norm.weight"])
        gate, up = x @ w[p + "ffn_gate.weight"].T, x @ w[p + "ffn_up.weight"].T
        h = h + (F.silu(gate) * up) @ w[p + "ffn_down.weight"].T
    return norm(h, w["output_norm.weight"]) @ w["output.weight"].T


@pytest.fixture(scope="module")
def qwen2_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2") / "tiny-qwen2.gguf"
    weights = write_qwen2_gguf(path)
    return path, weights


def test_qwen2_config_comes_from_the_file(qwen2_file):
    config = gguf_config(qwen2_file[0])
    assert config.arch == "qwen2" and config.qkv_bias and not config.tied
    assert config.rope_layout == "half"  # Qwen2 GGUF keeps transformers' q/k layout
    assert (config.rope_theta, config.max_positions, config.n_kv_heads) == (1e6, 512, 2)
    assert "blk.0.attn_q.bias" in config.stage_tensor_names(0, 1)


def test_qwen2_stages_equal_the_hand_written_reference(qwen2_file):
    path, weights = qwen2_file
    source = open_model(str(path))
    whole = Stage(source.config, source.load(0, 3), 0, 3).forward(PROMPT)[0]
    expected = reference_logits(weights, PROMPT)
    assert (whole.double() - expected).abs().max() < 1e-5
    # split in two stages, prompt then decode steps through the KV cache: the same logits
    stages = [Stage(source.config, source.load(0, 1), 0, 1), Stage(source.config, source.load(1, 3), 1, 3)]
    caches = [KVCache(), KVCache()]
    rows = []
    for x in (PROMPT[:, :40], *(PROMPT[:, i : i + 1] for i in range(40, 64))):
        h = x
        for stage, cache in zip(stages, caches, strict=True):
            h = stage.forward(h, cache)
        rows.append(h[0])
    assert (torch.cat(rows).double() - expected).abs().max() < 1e-5


def test_qwen2_equals_the_logits_transformers_computed_from_the_same_file(qwen2_file):
    """Reference logits made by transformers 5.25.0 (``AutoModelForCausalLM.from_pretrained(dir,
    gguf_file=...)``) from this very file; re-made by the live test below where transformers runs."""
    path, _ = qwen2_file
    ref = json.loads(REFERENCE.read_text())
    assert ref["prompt"] == PROMPT[0].tolist()
    source = open_model(str(path))
    ours = Stage(source.config, source.load(0, 3), 0, 3).forward(PROMPT)[0]
    for pos, logits in ref["logits"].items():
        assert (ours[int(pos)] - torch.tensor(logits)).abs().max() < 1e-5, pos


def test_qwen2_against_transformers_live(qwen2_file):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to read GGUF files")
    path, _ = qwen2_file
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        theirs = model(PROMPT).logits[0]
    source = open_model(str(path))
    ours = Stage(source.config, source.load(0, 3), 0, 3).forward(PROMPT)[0]
    assert (ours - theirs).abs().max() < 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    mine = source.tokenizer()
    for text in ("the cat in a hat", "Hello  world 123\n\nthe   end!!\n", "x's DON'T 4567 <|im_end|> ümlaut"):
        assert mine.encode(text).ids == tok(text)["input_ids"], text


def test_qwen2_tokenizer_splits_as_qwen2_does(qwen2_file):
    """Qwen2's pre-tokenizer: a letter run takes one leading non-letter (a space), digits go one by
    one, newlines apart; the merges then join " t" + "he" into " the"."""
    source = open_model(str(qwen2_file[0]))
    tok = source.tokenizer()
    ids = tok.encode("the 123\n\n the").ids
    the, space_the = tokens().index("he"), tokens().index("Ġthe")
    assert ids == [ord("t"), the, ord(" "), ord("1"), ord("2"), ord("3"), ord("\n"), ord("\n"), space_the]
    assert tok.decode(ids) == "the 123\n\n the"
    assert tok.token_to_id("<|im_end|>") == CONFIG.vocab_size - 1
    assert source.eos() == CONFIG.vocab_size - 3


def make_reference() -> None:  # pragma: no cover - run by hand where transformers is installed
    """python -c 'import tests.test_mesh_qwen2 as t; t.make_reference()' (transformers + accelerate)."""
    import tempfile

    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny-qwen2.gguf"
        write_qwen2_gguf(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, gguf_file=path.name, dtype=torch.float32
        )
        with torch.no_grad():
            logits = model.eval()(PROMPT).logits[0]
    out = {"transformers": transformers.__version__, "prompt": PROMPT[0].tolist(),
           "logits": {str(p): [round(float(v), 7) for v in logits[p]] for p in (0, 31, 63)}}  # fmt: skip
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps(out) + "\n")
