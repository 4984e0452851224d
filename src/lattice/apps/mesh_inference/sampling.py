"""Choosing the next token from logits: greedy, or sampled with temperature, top-k, top-p and a
repetition penalty, from a seeded generator.

Pure functions of (logits, settings, history, generator): the client runs them on the logits the
last stage returns, and :func:`lattice.apps.mesh_inference.model.generate_local` on one process's,
so a seed gives the same tokens both ways (the mesh's logits are bitwise one process's).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lattice.errors import ConfigError

__all__ = ["Sampler", "Sampling", "next_token"]

MAX_TEMPERATURE = 100.0
MAX_PENALTY = 100.0


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. ``temperature`` 0 is greedy (argmax: bitwise the single-process
    tokens); ``top_k`` 0 and ``top_p`` 1 keep every token; ``repetition_penalty`` > 1 divides the
    positive logits (multiplies the negative ones) of tokens already in the prompt or the output
    (CTRL, as transformers does); ``seed`` None draws one."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise ConfigError(f"temperature must be in 0..{MAX_TEMPERATURE}")
        if type(self.top_k) is not int or self.top_k < 0:
            raise ConfigError("top_k must be an integer >= 0 (0: off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("top_p must be in (0, 1]")
        if not 0.0 < self.repetition_penalty <= MAX_PENALTY:
            raise ConfigError(f"repetition_penalty must be in (0, {MAX_PENALTY}]")
        if self.seed is not None and (type(self.seed) is not int or not 0 <= self.seed < 1 << 63):
            raise ConfigError("seed must be an integer in 0..2**63-1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def penalize(logits: torch.Tensor, history: Iterable[int], penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty on a copy of ``logits`` [vocab] for the tokens of ``history``."""
    if penalty == 1.0:
        return logits
    ids = torch.tensor(sorted({t for t in history if 0 <= t < logits.shape[0]}), dtype=torch.int64)
    if ids.numel() == 0:
        return logits
    out = logits.clone()
    picked = out[ids]
    out[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` with the tokens outside the top k, then outside the smallest set holding top_p of
    the probability, set to -inf (at least the most likely token stays)."""
    out = logits
    if 0 < top_k < out.shape[0]:
        kth = torch.topk(out, top_k).values[-1]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # the mass before it already fills top_p
        drop[0] = False
        out = out.clone()
        out[order[drop]] = float("-inf")
    return out


def next_token(
    logits: torch.Tensor, sampling: Sampling, history: Iterable[int], generator: torch.Generator
) -> int:
    """The next token for the last position's ``logits`` [vocab] (fp32)."""
    logits = penalize(logits.float(), history, sampling.repetition_penalty)
    if sampling.greedy:
        return int(logits.argmax())
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class Sampler:
    """``sampler(logits) -> token`` for one sequence: its settings, its generator (seeded), and the
    tokens so far (the prompt, then each token it picked) for the repetition penalty."""

    def __init__(self, sampling: Sampling, prompt: Iterable[int] = ()) -> None:
        self.sampling = sampling
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.history = list(prompt)

    def __call__(self, logits: torch.Tensor) -> int:
        token = next_token(logits, self.sampling, self.history, self.generator)
        self.history.append(token)
        return token
