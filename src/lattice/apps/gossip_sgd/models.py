"""Models as functions of a flat parameter vector, batched over peers.

Parameters of ``n`` peers are one ``[n, d]`` tensor; the forward pass uses batched matmuls, so the
simulator runs 16 peers as fast as one large model, and a network peer is simply ``n = 1``. Flat
vectors are also what gossip sends: one tensor per message, no per-layer bookkeeping.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor


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


@torch.no_grad()
def accuracy(model: MLP, params: Tensor, x: Tensor, y: Tensor, head: int = 0, chunk: int = 2000) -> Tensor:
    """Test accuracy of each of the n models on the same (x, y): [n]."""
    n, correct = params.shape[0], torch.zeros(params.shape[0])
    for s in range(0, len(x), chunk):
        xb = x[s : s + chunk].unsqueeze(0).expand(n, -1, -1)
        pred = model.forward_heads(params, xb)[:, head].argmax(-1)
        correct += (pred == y[s : s + chunk]).sum(-1).float()
    return correct / len(x)
