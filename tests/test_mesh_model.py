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
