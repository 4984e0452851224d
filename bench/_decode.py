"""Greedy decoding in one process, timed: the single-process reference of the mesh benches."""

from __future__ import annotations

import time

import torch

from lattice.apps.mesh_inference.model import KVCache, Stage


def timed_greedy(stage: Stage, prompt: list[int], n: int) -> tuple[list[int], float]:
    """``n`` greedy tokens of a whole-model ``stage`` and its decode tokens/s (prefill excluded, as
    for the mesh)."""
    cache = KVCache()
    logits = stage.forward(torch.tensor([prompt]), cache)[0, -1]
    tokens = [int(logits.argmax())]
    t0 = time.perf_counter()
    while len(tokens) < n:
        logits = stage.forward(torch.tensor([[tokens[-1]]]), cache)[0, -1]
        tokens.append(int(logits.argmax()))
    return tokens, (n - 1) / (time.perf_counter() - t0)
