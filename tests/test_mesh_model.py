"""The stage runner on a tiny random LLaMA: splits are bitwise equal, the KV cache equals recompute."""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")

from lattice.apps.mesh_inference.model import (  # noqa: E402
    KVCache,
    Stage,
    chunk_bounds,
    greedy_generate,
    random_weights,
    split_evenly,
    tiny_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stages_for(config, weights, ranges):
    return [Stage(config, weights, a, b) for a, b in ranges]


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_split_into_stages_is_bitwise_equal_to_one_stage(layout):
    config = tiny_config(rope_layout=layout)
    weights = random_weights(config, seed=1)
    tokens = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    single = Stage(config, weights, 0, config.n_layers).forward(tokens)
    for ranges in ([(0, 2), (2, 4), (4, 6)], [(0, 1), (1, 6)], [(0, 5), (5, 6)]):
        h = tokens
        for stage in stages_for(config, weights, ranges):
            h = stage.forward(h)
        assert h.shape == (1, 12, config.vocab_size)
        assert torch.equal(h, single), ranges


def test_a_stage_runs_a_sub_range_of_its_blocks():
    config = tiny_config()
    weights = random_weights(config, seed=2)
    tokens = torch.tensor([[5, 6, 7]])
    wide = Stage(config, weights, 0, 6)
    full = wide.forward(tokens)
    h = wide.forward(tokens, start=0, end=3)
    assert torch.equal(wide.forward(h, start=3, end=6), full)
    with pytest.raises(ValueError, match="outside"):
        Stage(config, weights, 2, 4).forward(h, start=1, end=3)


def test_kv_cache_decoding_matches_full_recompute():
    config = tiny_config()
    weights = random_weights(config, seed=3)
    stage = Stage(config, weights, 0, config.n_layers)
    seq = torch.randint(0, config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    full = stage.forward(seq)
    cache = KVCache()
    parts = [stage.forward(seq[:, :8], cache)]
    for i in range(8, 20):
        parts.append(stage.forward(seq[:, i : i + 1], cache))
    cached = torch.cat(parts, dim=1)
    assert cache.length == 20 and len(cache.layers) == config.n_layers
    assert torch.allclose(cached, full, atol=1e-5, rtol=1e-5)
    assert torch.equal(cached.argmax(-1), full.argmax(-1))


def test_greedy_generation_is_the_same_split_or_not():
    config = tiny_config()
    weights = random_weights(config, seed=4)
    prompt = [1, 2, 3, 4]
    one = greedy_generate(stages_for(config, weights, [(0, 6)]), prompt, 16)
    three = greedy_generate(stages_for(config, weights, split_evenly(6, 3)), prompt, 16)
    assert one == three and len(one) == 16
    # and equal to recomputing the whole sequence each step (no cache)
    stage = Stage(config, weights, 0, 6)
    seq = list(prompt)
    for _ in range(16):
        seq.append(int(stage.forward(torch.tensor([seq]))[0, -1].argmax()))
    assert seq[len(prompt) :] == one


def test_random_weights_are_deterministic_and_partial():
    config = tiny_config()
    a = random_weights(config, seed=7)
    b = random_weights(config, seed=7, names=config.stage_tensor_names(2, 4))
    assert set(b) == set(config.stage_tensor_names(2, 4))
    assert all(torch.equal(a[n], b[n]) for n in b)
    with pytest.raises(ValueError, match="missing"):
        Stage(config, b, 0, 2)


def test_rope_layouts_differ_and_bad_ranges_are_refused():
    w = random_weights(tiny_config(), seed=5)
    tokens = torch.tensor([[1, 2, 3]])
    a = Stage(tiny_config(), w, 0, 6).forward(tokens)
    b = Stage(tiny_config(rope_layout="half"), w, 0, 6).forward(tokens)
    assert not torch.equal(a, b)
    with pytest.raises(ValueError):
        Stage(tiny_config(), w, 3, 3)
    with pytest.raises(ValueError):
        tiny_config(rope_layout="other")


@pytest.mark.parametrize("n", [65, 255, 257, 700, 2048])
def test_a_prompt_in_chunks_is_bitwise_equal_to_one_piece(n):
    """What lets a server bound attention memory without changing a single logit."""
    config = tiny_config()
    stage = Stage(config, random_weights(config, seed=6), 0, config.n_layers)
    x = torch.randint(0, config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
    whole = stage.forward(x)
    for chunk in (64, 100, 256):
        cache = KVCache()
        parts = [stage.forward(x[:, a:b], cache) for a, b in chunk_bounds(n, chunk)]
        assert torch.equal(torch.cat(parts, dim=1), whole), chunk
        assert cache.length == n


def test_chunk_bounds_cover_the_prompt_without_short_pieces():
    assert chunk_bounds(10, 64) == [(0, 10)]
    for n, chunk in ((65, 64), (257, 256), (2048, 256), (1000, 100), (129, 64)):
        bounds = chunk_bounds(n, chunk)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a2 == b1 for (_, b1), (a2, _) in itertools.pairwise(bounds))
        assert all(chunk // 2 <= b - a <= chunk for a, b in bounds), (n, chunk, bounds)


def test_step_bytes_grow_with_rows_times_context_and_head_false_skips_the_logits():
    config = tiny_config()
    small, big = config.step_bytes(256, 2048, False), config.step_bytes(8192, 8192, False)
    assert big > 100 * small  # what the unchunked 8,192-token prompt asked for
    assert config.step_bytes(256, 2048, True) - small == 256 * config.vocab_size * 4
    stage = Stage(config, random_weights(config, seed=1), 0, config.n_layers)
    h = stage.forward(torch.tensor([[1, 2, 3]]), head=False)
    assert h.shape == (1, 3, config.hidden)


def _clone(cache: KVCache) -> KVCache:
    out = KVCache()
    out.layers = {i: (k.clone(), v.clone()) for i, (k, v) in cache.layers.items()}
    out.length = cache.length
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_step_is_bitwise_the_same_alone_or_in_a_batch(dtype):
    """What lets a server batch sessions (continuous batching) without changing anybody's tokens:
    decode steps of sessions with different contexts, and a prompt chunk riding along, give the
    same logits and caches in one forward_batch as each in a step of its own."""
    config = tiny_config()
    weights = random_weights(config, seed=8)
    stages = [Stage(config, weights, 0, 2, dtype), Stage(config, weights, 2, 6, dtype)]
    prompts = [[1, 2, 3], [5] * 7, list(range(40, 110)), [9, 8]]
    caches = [[KVCache() for _ in prompts] for _ in stages]
    for j, p in enumerate(prompts):
        h = torch.tensor([p])
        for s, stage in enumerate(stages):
            h = stage.forward(h, caches[s][j])
    rng = torch.Generator().manual_seed(9)
    steps = [torch.randint(0, 256, (1, n), generator=rng) for n in (1, 1, 1, 64)]  # 3 decodes + a chunk
    heads = [True, True, True, False]
    alone_caches = [[_clone(c) for c in per_stage] for per_stage in caches]
    batched, alone = list(steps), list(steps)
    for s, stage in enumerate(stages):
        batched = stage.forward_batch(batched, caches[s], heads=heads)
        alone = [stage.forward(x, c, head=hd) for x, c, hd in zip(alone, alone_caches[s], heads, strict=True)]
    for b, a in zip(batched, alone, strict=True):
        assert b.dtype == torch.float32 and torch.equal(b, a)
    assert batched[0].shape == (1, 1, config.vocab_size) and batched[3].shape == (1, 64, config.hidden)
    for per_stage, per_stage_alone in zip(caches, alone_caches, strict=True):
        for c, ca in zip(per_stage, per_stage_alone, strict=True):
            assert c.length == ca.length
            assert all(torch.equal(c.layers[i][0], ca.layers[i][0]) for i in c.layers)


def test_blas_gives_a_row_the_same_result_from_four_rows_on():
    """The property ROW_PAD rests on (of this torch build's BLAS, MKL): a row's product is the
    same for any row count >= 4, so padding a decode step to 4 rows makes it batch-invariant."""
    from lattice.apps.mesh_inference.config import ROW_PAD

    rng = torch.Generator().manual_seed(0)
    for n, k in ((64, 64), (128, 64), (576, 576), (1536, 576)):
        w, x = torch.randn(n, k, generator=rng), torch.randn(80, k, generator=rng)
        base = torch.nn.functional.linear(x[:ROW_PAD], w)[0]
        for rows in (ROW_PAD, 5, 7, 8, 16, 33, 64, 80):
            assert torch.equal(torch.nn.functional.linear(x[:rows], w)[0], base), (n, k, rows)


def test_low_precision_stages_keep_matrices_in_their_dtype_and_split_bitwise():
    config = tiny_config()
    weights = random_weights(config, seed=10)
    tokens = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    for dtype in ("bfloat16", "float16"):
        whole = Stage(config, weights, 0, 6, dtype)
        assert whole.w["blk.0.attn_q.weight"].dtype == getattr(torch, dtype)
        assert whole.w["blk.0.attn_norm.weight"].dtype == torch.float32  # vectors stay fp32
        h = tokens
        for a, b in ((0, 3), (3, 6)):
            h = Stage(config, weights, a, b, dtype).forward(h)
        assert torch.equal(h, whole.forward(tokens))
        fp32 = Stage(config, weights, 0, 6).forward(tokens)
        assert 0 < (h - fp32).abs().max() < 0.25  # close, not equal
    with pytest.raises(ValueError, match="dtype"):
        Stage(config, weights, 0, 6, "int8")
