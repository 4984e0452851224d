"""Models as functions of a flat parameter vector, batched over peers.

Parameters of ``n`` peers are one ``[n, d]`` tensor; the forward pass uses batched matmuls, so the
simulator runs 16 peers as fast as one large model, and a network peer is simply ``n = 1``. Flat
vectors are also what gossip sends: one tensor per message, no per-layer bookkeeping.

Any ``torch.nn.Module`` becomes such a model with :class:`ModuleModel` (``torch.func.functional_call``
over the unflattened vector of each peer); :func:`small_cnn` is the built-in CNN.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn


class FlatModel(Protocol):
    """What the algorithms and the batch oracle need of a model."""

    dim: int  # parameters
    heads: int  # output heads (MHD's MLP has several; others one)

    def init(self, seed: int = 0) -> Tensor:
        """Initial parameters as one flat float32 vector [dim]."""

    def forward(self, params: Tensor, x: Tensor) -> Tensor:
        """Logits of the main head: params [n, dim], x [n, B, ...] -> [n, B, classes]."""

    def forward_heads(self, params: Tensor, x: Tensor) -> Tensor:
        """Logits of every head: [n, heads, B, classes]."""


class MLP:
    """ReLU MLP ``sizes[0] -> ... -> sizes[-1]`` with ``heads`` output heads on the last hidden layer."""

    def __init__(self, sizes: tuple[int, ...] = (784, 200, 200, 10), heads: int = 1) -> None:
        if len(sizes) < 2 or heads < 1:
            raise ValueError("an MLP needs an input and an output size, and at least one head")
        self.sizes = tuple(sizes)
        self.heads = heads
        self.shapes: list[tuple[int, int]] = list(itertools.pairwise(sizes[:-1]))
        self.shapes += [(sizes[-2], sizes[-1])] * heads
        self.dim = sum(a * b + b for a, b in self.shapes)

    def init(self, seed: int = 0) -> Tensor:
        """nn.Linear's default init (uniform +-1/sqrt(fan_in)), as one flat float32 vector."""
        g = torch.Generator().manual_seed(seed)
        parts = []
        for a, b in self.shapes:
            bound = 1.0 / math.sqrt(a)
            parts.append((torch.rand(a * b + b, generator=g) * 2 - 1) * bound)
        return torch.cat(parts)

    def _layers(self, params: Tensor) -> list[tuple[Tensor, Tensor]]:
        n, off, out = params.shape[0], 0, []
        for a, b in self.shapes:
            w = params[:, off : off + a * b].view(n, a, b)
            bias = params[:, off + a * b : off + a * b + b].view(n, 1, b)
            out.append((w, bias))
            off += a * b + b
        return out

    def forward_heads(self, params: Tensor, x: Tensor) -> Tensor:
        """Logits of every head: params [n, d], x [n, B, in] -> [n, heads, B, out]."""
        layers = self._layers(params)
        h = x
        for w, b in layers[: len(layers) - self.heads]:
            h = torch.relu(torch.baddbmm(b, h, w))
        return torch.stack([torch.baddbmm(b, h, w) for w, b in layers[len(layers) - self.heads :]], dim=1)

    def forward(self, params: Tensor, x: Tensor) -> Tensor:
        """Logits of the main head: [n, B, out]."""
        return self.forward_heads(params, x)[:, 0]


class ModuleModel:
    """A ``torch.nn.Module`` as a flat model: ``make()`` builds it (called under a seed by ``init``);
    the forward pass is ``functional_call`` on each peer's unflattened vector.
    Buffers (e.g. BatchNorm's running statistics) are shared, not per peer: prefer GroupNorm."""

    heads = 1

    def __init__(self, make: Callable[[], nn.Module]) -> None:
        self.make = make
        self.module = make()
        params = dict(self.module.named_parameters())
        self.names = list(params)
        self.shapes = [tuple(p.shape) for p in params.values()]
        self.sizes = [p.numel() for p in params.values()]
        self.dim = sum(self.sizes)
        self.buffers = dict(self.module.named_buffers())

    def init(self, seed: int = 0) -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = self.make()
        return torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])

    def to(self, device: str | torch.device) -> ModuleModel:
        self.module = self.module.to(device)
        self.buffers = dict(self.module.named_buffers())
        return self

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        parts = torch.split(flat, self.sizes)
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def _one(self, flat: Tensor, x: Tensor) -> Tensor:
        return torch.func.functional_call(self.module, {**self.buffers, **self.unflatten(flat)}, (x,))

    def forward(self, params: Tensor, x: Tensor) -> Tensor:
        # one peer after the other: vmap over a CNN's peers was 3x slower on CPU (batched conv weights)
        return torch.stack([self._one(params[i], x[i]) for i in range(params.shape[0])])

    def forward_heads(self, params: Tensor, x: Tensor) -> Tensor:
        return self.forward(params, x).unsqueeze(1)


def small_cnn(classes: int = 10) -> nn.Module:
    """Two 5x5 conv layers (16, 32 channels, ReLU, 2x2 max-pool) and a linear layer, for 28x28
    grey images given as flat rows of 784 (Fashion-MNIST as data.py loads it): 18.4k parameters."""
    return nn.Sequential(
        nn.Unflatten(-1, (1, 28, 28)),
        nn.Conv2d(1, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(-3),
        nn.Linear(32 * 4 * 4, classes),
    )


@torch.no_grad()
def accuracy(
    model: FlatModel, params: Tensor, x: Tensor, y: Tensor, head: int = 0, chunk: int = 2000
) -> Tensor:
    """Test accuracy of each of the n models on the same (x, y): [n]."""
    n, correct = params.shape[0], torch.zeros(params.shape[0], device=params.device)
    for s in range(0, len(x), chunk):
        part = x[s : s + chunk].to(params.device)
        xb = part.unsqueeze(0).expand(n, *part.shape)
        pred = model.forward_heads(params, xb)[:, head].argmax(-1)
        correct += (pred == y[s : s + chunk].to(params.device)).sum(-1).float()
    return (correct / len(x)).cpu()
