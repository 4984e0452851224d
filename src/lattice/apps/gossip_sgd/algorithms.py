"""Decentralized training algorithms as sans-IO state machines over flat parameter rows.

An algorithm holds the state of ``n`` local peers (rows of ``[n, d]`` tensors: all 16 peers in the
simulator, one on the network). ``round(t)`` is a generator: it computes locally, then *yields* a
:class:`Send` (named tensors, one row per local peer, and a codec per name) and is resumed with a
:class:`Received` that can mix the neighbours' rows with the mixing weights. Whoever drives the
generator decides how messages travel (in memory, or over ``node.rpc``), so the same code runs in
both modes. Equations: shared notes, section 1 (D-PSGD, DFedAvg, DFedSAM(-MGS), DProxSGT, CDProxSGT,
multi-headed distillation).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lattice.apps.gossip_sgd.hyper import ALGORITHMS, Hyper
from lattice.apps.gossip_sgd.models import MLP


@dataclass
class Send:
    """Messages of one phase: ``tensors[name]`` is ``[n, ...]`` (row i goes to peer i's neighbours)."""

    phase: str
    tensors: dict[str, Tensor]
    codecs: dict[str, str | None] = field(default_factory=dict)
    self_exact: bool = True  # mix a peer's own row uncompressed (False: as the neighbours decode it)
    # name -> the sender's reference before this message: ``tensors[name]`` is a difference the
    # receivers add to their copy of that reference (CDProxSGT); ``Received.mix_ref`` mixes the copies
    refs: dict[str, Tensor] = field(default_factory=dict)


class Received(Protocol):
    def mix(self, name: str) -> Tensor:
        """sum_j w_ij m_j over i and its neighbours that answered (weights re-normalized): [n, ...]."""

    def sent(self, name: str) -> Tensor:
        """Each row as the neighbours decoded it (after compression): [n, ...]."""

    def neighbours(self, name: str) -> list[list[Tensor]]:
        """For each local row, the decoded rows received from its neighbours."""

    def mix_ref(self, name: str) -> Tensor:
        """sum_j w_ij (ref_j + decoded difference_j) with this round's weights, over i and the
        neighbours whose reference copy is known to be exact (the rest's weight stays on i): the
        mixed references rebuilt whenever the weights change, never a running sum."""


Round = Generator[Send, Received, None]


class LocalData:
    """The private training data of the local rows, sampled in one vectorized draw per step."""

    def __init__(self, x: Tensor, y: Tensor, parts: Sequence[np.ndarray], seed: int) -> None:
        if any(len(p) == 0 for p in parts):
            raise ValueError("every peer needs at least one training sample")
        self.x, self.y = x, y
        self.index = torch.from_numpy(np.concatenate(parts)).long()
        sizes = torch.tensor([len(p) for p in parts])
        self.sizes = sizes
        self.offsets = torch.cumsum(sizes, 0) - sizes
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, size: int) -> tuple[Tensor, Tensor]:
        u = torch.rand(len(self.sizes), size, generator=self.gen)
        pick = self.index[self.offsets[:, None] + (u * self.sizes[:, None]).long()]
        return self.x[pick], self.y[pick]


class Algorithm:
    """State and local computation shared by all algorithms; subclasses define ``round``."""

    name = ""
    needs_public = False

    def __init__(self, model: MLP, data: LocalData, hp: Hyper, x0: Tensor) -> None:
        self.model, self.data, self.hp = model, data, hp
        self.n = len(data.sizes)
        self.x = x0.expand(self.n, -1).clone()  # every peer starts from the same point
        self.gradients = 0  # stochastic gradient evaluations per peer so far
        self.last_loss = float("nan")

    def grad(self, params: Tensor, batch: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(per-row loss [n], per-row gradient [n, d]) of the main head's cross-entropy."""
        xb, yb = batch if batch is not None else self.data.batch(self.hp.batch)
        p = params.detach().requires_grad_(True)
        logits = self.model.forward(p, xb)
        loss = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(self.n, -1).mean(1)
        (g,) = torch.autograd.grad(loss.sum(), p)
        self.gradients += 1
        self.last_loss = float(loss.detach().mean())
        return loss.detach(), g

    def sgd_steps(self, x: Tensor, steps: int, rho: float = 0.0) -> Tensor:
        """``steps`` local SGD steps (SAM with radius ``rho`` if > 0: two gradients on one batch)."""
        for _ in range(steps):
            batch = self.data.batch(self.hp.batch)
            _, g = self.grad(x, batch)
            if rho > 0:
                eps = rho * g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
                _, g = self.grad(x + eps, batch)  # counted: SAM costs two gradients per step
            x = x - self.hp.lr * g
        return x

    def round(self, t: int) -> Round:
        raise NotImplementedError
        yield  # pragma: no cover

    def models(self) -> Tensor:
        """The local models being evaluated: [n, d]."""
        return self.x

    def membership_changed(self) -> None:
        """Called before the first round whose graph lost a peer (the same round at every survivor).
        Plain gossip needs nothing: the new weights are doubly stochastic over the survivors."""


class DPSGD(Algorithm):
    """x <- W (x - lr g(x)) after every gradient step (adapt-then-combine)."""

    name = "dpsgd"

    def round(self, t: int) -> Round:
        for k in range(self.hp.local_steps):
            _, g = self.grad(self.x)
            r = yield Send(f"s{k}", {"x": self.x - self.hp.lr * g}, {"x": self.hp.codec})
            self.x = r.mix("x")


class DFedAvg(Algorithm):
    """K local steps (SAM if rho > 0), then Q gossip steps: x <- W^Q z (DFedSAM(-MGS) with rho, Q)."""

    name = "dfedavg"
    rho = 0.0
    gossip_steps = 1

    def round(self, t: int) -> Round:
        self.x = self.sgd_steps(self.x, self.hp.local_steps, self.rho)
        for q in range(self.gossip_steps):
            r = yield Send(f"q{q}", {"x": self.x}, {"x": self.hp.codec})
            self.x = r.mix("x")


class DFedSAM(DFedAvg):
    name = "dfedsam"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.rho = self.hp.rho


class DFedSAMMGS(DFedSAM):
    name = "dfedsam_mgs"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.gossip_steps = self.hp.mgs_steps


def prox_l1(z: Tensor, threshold: float) -> Tensor:
    """Soft-thresholding: the proximal map of threshold * ||.||_1."""
    if threshold <= 0:
        return z
    return torch.sign(z) * torch.clamp(z.abs() - threshold, min=0)


class DProxSGT(Algorithm):
    """Gradient tracking (adapt-then-combine, two gossips per step); DSGT when l1 = 0."""

    name = "dproxsgt"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.y = torch.zeros_like(self.x)
        self.g_prev = torch.zeros_like(self.x)

    def tracked_grad(self) -> Tensor:
        _, g = self.grad(self.x)
        if self.hp.clip > 0:
            g = g * torch.clamp(self.hp.clip / g.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)
        y_half = self.y + g - self.g_prev
        self.g_prev = g
        return y_half

    def membership_changed(self) -> None:
        """Restart tracking (y = the last local gradient): a departed peer took its share of
        sum_i (y_i - g_i) with it, which would otherwise bias the survivors' trackers for good."""
        self.y = self.g_prev.clone()

    def round(self, t: int) -> Round:
        for k in range(self.hp.local_steps):
            r = yield Send(f"y{k}", {"y": self.tracked_grad()})
            self.y = r.mix("y")
            x_half = prox_l1(self.x - self.hp.lr * self.y, self.hp.lr * self.hp.l1)
            r = yield Send(f"x{k}", {"x": x_half})
            self.x = r.mix("x")


class DSGT(DProxSGT):
    name = "dsgt"


class CDProxSGT(DProxSGT):
    """Compressed tracking: only compressed differences to reference copies x_hat, y_hat travel.

    The reference copies act as error feedback: what compression dropped stays in x - x_hat and is
    sent in a later step. The mixed references (W x_hat, W y_hat) are rebuilt from the neighbours'
    copies with each phase's weights (``mix_ref``): a running sum of mixed differences would assume a
    fixed W, and drifts when the topology is time-varying, a peer leaves or joins, or a message is
    late. With identity codecs and gamma = 1 this is exactly DProxSGT.
    """

    name = "cdproxsgt"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.x_hat = self.x.clone()
        self.y_hat = torch.zeros_like(self.x)

    def round(self, t: int) -> Round:
        hp = self.hp
        for k in range(hp.local_steps):
            y_half = self.tracked_grad()
            r = yield Send(
                f"y{k}",
                {"dy": y_half - self.y_hat},
                {"dy": hp.codec_y},
                self_exact=False,
                refs={"dy": self.y_hat},
            )
            wy_hat = r.mix_ref("dy")
            self.y_hat = self.y_hat + r.sent("dy")
            self.y = y_half + hp.gamma_y * (wy_hat - self.y_hat)
            x_half = prox_l1(self.x - hp.lr * self.y, hp.lr * hp.l1)
            r = yield Send(
                f"x{k}",
                {"dx": x_half - self.x_hat},
                {"dx": hp.codec_x},
                self_exact=False,
                refs={"dx": self.x_hat},
            )
            wx_hat = r.mix_ref("dx")
            self.x_hat = self.x_hat + r.sent("dx")
            self.x = x_half + hp.gamma_x * (wx_hat - self.x_hat)


class MHD(Algorithm):
    """Multi-headed distillation: only logits on a shared public batch travel; weights never leave.

    Head 0 learns the private task; auxiliary head k distils, per public sample, the most confident
    neighbour's head k-1, so head k gathers knowledge from k hops away.
    """

    name = "mhd"
    needs_public = True

    def __init__(self, *a, public: Tensor, seed: int = 0, **kw) -> None:
        super().__init__(*a, **kw)
        if self.model.heads != self.hp.heads + 1:
            raise ValueError("the MHD model needs heads + 1 output heads")
        self.public = public
        self.seed = seed

    def public_batch(self, t: int) -> Tensor:
        """The same public samples at every peer for round t (derived from the run seed)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + t)
        idx = torch.randint(len(self.public), (self.hp.public_batch,), generator=g)
        return self.public[idx]

    def round(self, t: int) -> Round:
        hp, n = self.hp, self.n
        xp = self.public_batch(t).unsqueeze(0).expand(n, -1, -1)
        with torch.no_grad():
            logits = self.model.forward_heads(self.x, xp)[:, : hp.heads]  # heads 0..H-1
        r = yield Send("logits", {"logits": logits}, {"logits": hp.codec})
        teachers = torch.zeros(n, hp.heads, hp.public_batch, logits.shape[-1])
        has = torch.zeros(n, dtype=torch.bool)
        for i, received in enumerate(r.neighbours("logits")):
            if not received:
                continue
            p = torch.softmax(torch.stack(received) / hp.tau, dim=-1)  # [deg, H, P, C]
            best = p.amax(-1).argmax(0)  # most confident neighbour per (head, sample)
            teachers[i] = torch.gather(p, 0, best[None, ..., None].expand(1, *p.shape[1:])).squeeze(0)
            has[i] = True
        for _ in range(hp.local_steps):
            xb, yb = self.data.batch(hp.batch)
            p = self.x.detach().requires_grad_(True)
            main = self.model.forward_heads(p, xb)[:, 0]
            sup = F.cross_entropy(main.flatten(0, 1), yb.flatten(), reduction="none").view(n, -1).mean(1)
            aux = self.model.forward_heads(p, xp)[:, 1:]  # heads 1..H on the public batch
            logq = torch.log_softmax(aux / hp.tau, dim=-1)
            kl = (teachers * (torch.log(teachers.clamp_min(1e-12)) - logq)).sum(-1).mean((1, 2))
            loss = sup + hp.nu * kl * has.float() * hp.heads
            (g,) = torch.autograd.grad(loss.sum(), p)
            self.gradients += 1
            self.last_loss = float(sup.detach().mean())
            self.x = (self.x - hp.lr * g).detach()


_CLASSES: dict[str, type[Algorithm]] = {
    c.name: c for c in (DPSGD, DFedAvg, DFedSAM, DFedSAMMGS, DSGT, DProxSGT, CDProxSGT, MHD)
}


def make(name: str, model: MLP, data: LocalData, hp: Hyper, x0: Tensor, **kw) -> Algorithm:
    if name not in _CLASSES:
        raise ValueError(f"unknown algorithm {name!r} (known: {', '.join(ALGORITHMS)})")
    return _CLASSES[name](model, data, hp, x0, **kw)


def model_for(name: str, hp: Hyper, sizes: tuple[int, ...] = (784, 200, 200, 10)) -> MLP:
    return MLP(sizes, heads=hp.heads + 1 if name == "mhd" else 1)
