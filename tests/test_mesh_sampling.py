"""Sampling: greedy stays argmax, a seed fixes the tokens, top-k / top-p / repetition penalty do
what transformers' do."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from lattice.apps.mesh_inference.model import (  # noqa: E402
    Stage,
    generate_local,
    greedy_generate,
    random_weights,
    tiny_config,
)
from lattice.apps.mesh_inference.sampling import Sampler, Sampling, filter_logits, next_token, penalize  # noqa: E402
from lattice.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = tiny_config()
STAGES = [Stage(CONFIG, random_weights(CONFIG, seed=12), 0, CONFIG.n_layers)]
PROMPT = [4, 8, 15, 16, 23, 42]


def test_temperature_zero_is_greedy():
    assert generate_local(STAGES, PROMPT, 12, Sampling()) == greedy_generate(STAGES, PROMPT, 12)
    logits = torch.randn(256, generator=torch.Generator().manual_seed(1))
    assert next_token(logits, Sampling(), [], torch.Generator()) == int(logits.argmax())


def test_a_seed_fixes_the_sampled_tokens():
    s = Sampling(temperature=1.2, top_k=50, top_p=0.95, seed=7)
    first = generate_local(STAGES, PROMPT, 16, s)
    assert generate_local(STAGES, PROMPT, 16, s) == first
    others = {tuple(generate_local(STAGES, PROMPT, 16, Sampling(temperature=1.2, seed=k))) for k in range(4)}
    assert len(others) > 1  # different seeds, different text
    assert first != greedy_generate(STAGES, PROMPT, 16)


def test_top_k_one_and_a_tiny_top_p_are_greedy():
    greedy = greedy_generate(STAGES, PROMPT, 10)
    assert generate_local(STAGES, PROMPT, 10, Sampling(temperature=5.0, top_k=1, seed=3)) == greedy
    assert generate_local(STAGES, PROMPT, 10, Sampling(temperature=5.0, top_p=1e-6, seed=3)) == greedy


def test_filters_keep_the_top_k_and_the_smallest_set_holding_top_p():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_logits(logits, 0, 0.5)).tolist() == [False, True, True, True]
    assert torch.isinf(filter_logits(logits, 0, 0.7)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_logits(logits, 0, 0.9)).tolist() == [False, False, False, True]


def test_samples_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    sampler = Sampler(Sampling(temperature=1.0, seed=0))
    counts = [0, 0, 0]
    for _ in range(3000):
        counts[next_token(probs.log(), sampler.sampling, [], sampler.generator)] += 1
    assert all(abs(c / 3000 - p) < 0.04 for c, p in zip(counts, probs.tolist(), strict=True)), counts
    hot = Sampling(temperature=0.25, seed=0)  # sharper: the likeliest token nearly always
    picks = [next_token(probs.log(), hot, [], sampler.generator) for _ in range(300)]
    assert picks.count(0) > 250


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([2.0, 1.5, -1.0, 0.5])
    out = penalize(logits, [0, 2, 99], 2.0)  # 99 is outside the vocabulary: ignored
    assert out.tolist() == [1.0, 1.5, -2.0, 0.5]
    assert logits.tolist() == [2.0, 1.5, -1.0, 0.5]  # a copy
    penalized = Sampling(repetition_penalty=2.0)
    assert next_token(logits, penalized, [0], torch.Generator()) == 1  # greedy, but not the repeat
    sampler = Sampler(penalized, prompt=[3])
    assert sampler(torch.tensor([0.3, 0.0, 0.0, 0.4])) == 0 and sampler.history == [3, 0]


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": -1},
        {"top_k": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"repetition_penalty": 0},
        {"seed": -1},
        {"seed": 1.5},
        {"temperature": math.inf},
    ],
)
def test_bad_settings_are_refused(kw):
    with pytest.raises(ConfigError):
        Sampling(**kw)
