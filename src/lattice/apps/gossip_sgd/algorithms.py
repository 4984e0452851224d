"""Decentralized training algorithms as sans-IO state machines over flat parameter rows.

An algorithm holds the state of ``n`` local peers (rows of ``[n, d]`` tensors: all 16 peers in the
simulator, one on the network). ``round(t)`` is a generator that yields two kinds of requests:
:class:`NeedGrad` (a stochastic gradient at some parameters, answered with ``(loss [n], grad [n, d])``)
and :class:`Send` (named tensors, one row per local peer, and a codec per name, answered with a
:class:`Received` that can mix the neighbours' rows with the mixing weights). Whoever drives the
generator decides where gradients come from (a batch oracle over a flat model, or the user's own
training loop: ``GossipOptimizer``) and how messages travel (in memory, or over ``node.rpc``), so the
same code runs in every mode. Equations: shared notes, section 1 (D-PSGD, DFedAvg, DFedSAM(-MGS),
DProxSGT, CDProxSGT, multi-headed distillation).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lattice.apps.gossip_sgd.hyper import ALGORITHMS, Hyper, lr_factor
from lattice.apps.gossip_sgd.models import MLP, FlatModel


@dataclass
class NeedGrad:
    """A stochastic gradient at ``params`` [n, d]: on a fresh batch, or (``same_batch``) on the batch
    of the previous request (SAM's second gradient, at the perturbed point)."""

    params: Tensor
    same_batch: bool = False


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


def _received(answer: Received | tuple[Tensor, Tensor] | None) -> Received:
    """What a Send was answered with (a driver answers a Send with a Received)."""
    assert answer is not None and not isinstance(answer, tuple), "a Send is answered with what was received"
    return answer


# A round yields Send (answered with what was Received) and NeedGrad (answered with (loss, grad));
# a driver starts it with None.
Round = Generator["Send | NeedGrad", "Received | tuple[Tensor, Tensor] | None", None]


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


class BatchOracle:
    """Answers :class:`NeedGrad` with the cross-entropy gradient of a flat model on a batch of each
    row's private data (the simulator's and the command line's source of gradients)."""

    def __init__(
        self, model: FlatModel, data: LocalData, batch: int, device: str | torch.device = "cpu"
    ) -> None:
        self.model, self.data, self.batch_size = model, data, batch
        self.device = torch.device(device)
        self._batch: tuple[Tensor, Tensor] | None = None

    def __call__(self, req: NeedGrad) -> tuple[Tensor, Tensor]:
        if self._batch is None or not req.same_batch:
            xb, yb = self.data.batch(self.batch_size)
            self._batch = xb.to(self.device), yb.to(self.device)
        xb, yb = self._batch
        n = req.params.shape[0]
        p = req.params.detach().requires_grad_(True)
        logits = self.model.forward(p, xb)
        loss = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(n, -1).mean(1)
        (g,) = torch.autograd.grad(loss.sum(), p)
        return loss.detach(), g


class Algorithm:
    """State and update rules shared by all algorithms; subclasses define ``round``.

    Local updates follow the paper's SGD step with the usual extras (all off by default): the
    gradient clipped to norm ``clip`` and given ``weight_decay * x`` (L2), heavy-ball ``momentum``
    on the descent direction, and the learning rate scaled by ``lr_schedule`` per round.
    """

    name = ""
    needs_public = False
    needs_model = False  # MHD computes its own distillation losses: the flat model and the data

    def __init__(self, hp: Hyper, x0: Tensor, n: int = 1, rounds: int = 0) -> None:
        self.hp = hp
        self.n = n
        self.rounds = rounds  # the schedule's horizon (0: no horizon, e.g. a user's open-ended loop)
        self.x = x0.expand(n, -1).clone()  # every peer starts from the same point
        self.m = torch.zeros_like(self.x) if hp.momentum else None
        self.t = 0  # the round being run
        self.gradients = 0  # stochastic gradient evaluations per peer so far
        self.last_loss = float("nan")

    @property
    def lr(self) -> float:
        return self.hp.lr * lr_factor(self.hp.lr_schedule, self.t, self.rounds)

    def grad(self, params: Tensor, same_batch: bool = False):
        """(Sub-generator) a stochastic gradient at ``params``, clipped and with weight decay."""
        answer = yield NeedGrad(params, same_batch)
        assert isinstance(answer, tuple), "a NeedGrad is answered with (loss, gradient)"
        loss, g = answer
        self.gradients += 1
        self.last_loss = float(loss.detach().float().mean())
        if self.hp.clip > 0:
            g = g * torch.clamp(self.hp.clip / g.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)
        if self.hp.weight_decay:
            g = g + self.hp.weight_decay * params
        return g

    def direction(self, d: Tensor) -> Tensor:
        """The descent direction after momentum (m <- mu m + d)."""
        if self.m is None:
            return d
        self.m = self.hp.momentum * self.m + d
        return self.m

    def sgd_steps(self, x: Tensor, steps: int, rho: float = 0.0):
        """(Sub-generator) ``steps`` local SGD steps (SAM with radius ``rho`` if > 0: the second
        gradient, at the perturbed point, on the same batch)."""
        for _ in range(steps):
            g = yield from self.grad(x)
            if rho > 0:
                eps = rho * g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
                g = yield from self.grad(x + eps, same_batch=True)  # counted: SAM costs two gradients
            x = x - self.lr * self.direction(g)
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

    def state(self) -> dict[str, Tensor]:
        """Every tensor of the algorithm's state by name (a checkpoint)."""
        out = {"x": self.x}
        if self.m is not None:
            out["m"] = self.m
        return out

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state` (missing entries keep their value: e.g. momentum off when saved)."""
        for name, value in state.items():
            current = getattr(self, name, None)
            if isinstance(current, Tensor) and current.shape == value.shape:
                setattr(self, name, value.to(current.device, current.dtype).clone())


class DPSGD(Algorithm):
    """x <- W (x - lr g(x)) after every gradient step (adapt-then-combine)."""

    name = "dpsgd"

    def round(self, t: int) -> Round:
        self.t = t
        for k in range(self.hp.local_steps):
            g = yield from self.grad(self.x)
            r = _received(
                (yield Send(f"s{k}", {"x": self.x - self.lr * self.direction(g)}, {"x": self.hp.codec}))
            )
            self.x = r.mix("x")


class DFedAvg(Algorithm):
    """K local steps (SAM if rho > 0), then Q gossip steps: x <- W^Q z (DFedSAM(-MGS) with rho, Q)."""

    name = "dfedavg"
    rho = 0.0
    gossip_steps = 1

    def round(self, t: int) -> Round:
        self.t = t
        self.x = yield from self.sgd_steps(self.x, self.hp.local_steps, self.rho)
        for q in range(self.gossip_steps):
            r = _received((yield Send(f"q{q}", {"x": self.x}, {"x": self.hp.codec})))
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

    def tracked_grad(self):
        """(Sub-generator) y + g - g_prev: the tracker before mixing."""
        g = yield from self.grad(self.x)
        y_half = self.y + g - self.g_prev
        self.g_prev = g
        return y_half

    def membership_changed(self) -> None:
        """Restart tracking (y = the last local gradient): a departed peer took its share of
        sum_i (y_i - g_i) with it, which would otherwise bias the survivors' trackers for good."""
        self.y = self.g_prev.clone()

    def step_x(self) -> Tensor:
        """x - lr * direction(y), then the L1 proximal map."""
        return prox_l1(self.x - self.lr * self.direction(self.y), self.lr * self.hp.l1)

    def round(self, t: int) -> Round:
        self.t = t
        for k in range(self.hp.local_steps):
            y_half = yield from self.tracked_grad()
            r = _received((yield Send(f"y{k}", {"y": y_half})))
            self.y = r.mix("y")
            r = _received((yield Send(f"x{k}", {"x": self.step_x()})))
            self.x = r.mix("x")

    def state(self) -> dict[str, Tensor]:
        return {**super().state(), "y": self.y, "g_prev": self.g_prev}


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
        self.t = t
        hp = self.hp
        for k in range(hp.local_steps):
            y_half = yield from self.tracked_grad()
            r = _received(
                (
                    yield Send(
                        f"y{k}",
                        {"dy": y_half - self.y_hat},
                        {"dy": hp.codec_y},
                        self_exact=False,
                        refs={"dy": self.y_hat},
                    )
                )
            )
            wy_hat = r.mix_ref("dy")
            self.y_hat = self.y_hat + r.sent("dy")
            self.y = y_half + hp.gamma_y * (wy_hat - self.y_hat)
            x_half = self.step_x()
            r = _received(
                (
                    yield Send(
                        f"x{k}",
                        {"dx": x_half - self.x_hat},
                        {"dx": hp.codec_x},
                        self_exact=False,
                        refs={"dx": self.x_hat},
                    )
                )
            )
            wx_hat = r.mix_ref("dx")
            self.x_hat = self.x_hat + r.sent("dx")
            self.x = x_half + hp.gamma_x * (wx_hat - self.x_hat)

    def state(self) -> dict[str, Tensor]:
        return {**super().state(), "x_hat": self.x_hat, "y_hat": self.y_hat}


class MHD(Algorithm):
    """Multi-headed distillation: only logits on a shared public batch travel; weights never leave.

    Head 0 learns the private task; auxiliary head k distils, per public sample, the most confident
    neighbour's head k-1, so head k gathers knowledge from k hops away. It computes its own losses,
    so it needs the multi-head MLP and the local data (not a user's training loop).
    """

    name = "mhd"
    needs_public = True
    needs_model = True

    def __init__(self, *a, model: MLP, data: LocalData, public: Tensor, seed: int = 0, **kw) -> None:
        super().__init__(*a, **kw)
        if not isinstance(model, MLP) or model.heads != self.hp.heads + 1:
            raise ValueError("MHD needs the MLP with heads + 1 output heads")
        self.model, self.data = model, data
        self.public = public
        self.seed = seed

    def public_batch(self, t: int) -> Tensor:
        """The same public samples at every peer for round t (derived from the run seed)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + t)
        idx = torch.randint(len(self.public), (self.hp.public_batch,), generator=g)
        return self.public[idx].to(self.x.device)

    def round(self, t: int) -> Round:
        self.t = t
        hp, n = self.hp, self.n
        xp = self.public_batch(t).unsqueeze(0).expand(n, -1, -1)
        with torch.no_grad():
            logits = self.model.forward_heads(self.x, xp)[:, : hp.heads]  # heads 0..H-1
        r = _received((yield Send("logits", {"logits": logits}, {"logits": hp.codec})))
        teachers = torch.zeros(n, hp.heads, hp.public_batch, logits.shape[-1], device=self.x.device)
        has = torch.zeros(n, dtype=torch.bool, device=self.x.device)
        for i, received in enumerate(r.neighbours("logits")):
            if not received:
                continue
            p = torch.softmax(torch.stack(received).to(self.x.device) / hp.tau, dim=-1)  # [deg, H, P, C]
            best = p.amax(-1).argmax(0)  # most confident neighbour per (head, sample)
            teachers[i] = torch.gather(p, 0, best[None, ..., None].expand(1, *p.shape[1:])).squeeze(0)
            has[i] = True
        for _ in range(hp.local_steps):
            xb, yb = self.data.batch(hp.batch)
            xb, yb = xb.to(self.x.device), yb.to(self.x.device)
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
            self.x = (self.x - self.lr * self.direction(g)).detach()


_CLASSES: dict[str, type[Algorithm]] = {
    c.name: c for c in (DPSGD, DFedAvg, DFedSAM, DFedSAMMGS, DSGT, DProxSGT, CDProxSGT, MHD)
}


def make(name: str, hp: Hyper, x0: Tensor, n: int = 1, rounds: int = 0, **kw) -> Algorithm:
    """The algorithm ``name`` for ``n`` local rows starting at ``x0`` [d] (MHD: ``model``, ``data``,
    ``public``, ``seed`` keywords)."""
    if name not in _CLASSES:
        raise ValueError(f"unknown algorithm {name!r} (known: {', '.join(ALGORITHMS)})")
    return _CLASSES[name](hp, x0, n, rounds, **kw)


def needs_closure(name: str) -> bool:
    """Whether a training loop must give ``step`` a closure (SAM: a second gradient per step)."""
    return name in ("dfedsam", "dfedsam_mgs")
