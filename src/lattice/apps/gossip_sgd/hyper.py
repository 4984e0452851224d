"""The algorithms' names and hyper-parameters: plain data, no torch, so that building the command line
(`lattice-node --help` lists the gossip-sgd commands) stays cheap."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ALGORITHMS", "Hyper", "lr_factor", "stability_warning"]

# CDProxSGT with top-k at ratio <= 0.1 diverged when gamma * (1 - w_ii) exceeded this for some peer
# (the weight its neighbours' compressed references get): 16 peers, Dir(0.3), 50 rounds, gamma 0.5:
# ring (1 - w_ii = 2/3: 0.33) stable, torus (4/5: 0.40), random-regular, exponential, random and
# full (15/16: 0.47) all NaN; gamma 0.3 and 0.2 stable on all six; top-30 % with gamma 0.5 too.
DIVERGENT_GAMMA_SHARE = 0.35

ALGORITHMS = ("dpsgd", "dfedavg", "dfedsam", "dfedsam_mgs", "dsgt", "dproxsgt", "cdproxsgt", "mhd")


@dataclass
class Hyper:
    lr: float = 0.05
    batch: int = 32
    local_steps: int = 10  # K: gradient steps per round (the budget every algorithm gets)
    rho: float = 0.01  # SAM radius
    mgs_steps: int = 4  # Q gossip steps per round (DFedSAM-MGS)
    l1: float = 0.0  # lambda of the proximal L1 term (DProxSGT / CDProxSGT)
    clip: float = 0.0  # gradient norm clip, every algorithm (0: off; the DProxSGT code uses 10)
    momentum: float = 0.0  # heavy-ball momentum on the local descent direction (0: off)
    weight_decay: float = 0.0  # L2: weight_decay * x added to each gradient
    lr_schedule: str = "constant"  # per round: constant, cosine, linear, step:EVERY:FACTOR, warmup:R[+...]
    # CDProxSGT consensus step sizes: 0.3 is stable on every built-in topology with top-10 %
    # (measured: docs/gossip_sgd.md); 0.5 diverged on every graph of degree >= 4 (see stability_warning)
    gamma_x: float = 0.3
    gamma_y: float = 0.3
    codec_x: str | None = "topk:0.1"  # CDProxSGT compressors (0.2x DSGT's bytes)
    codec_y: str | None = "topk:0.1"
    codec: str | None = None  # codec for the plain-gossip algorithms' model messages
    heads: int = 3  # MHD: auxiliary heads
    public_batch: int = 256  # MHD: public samples whose logits are exchanged per round
    nu: float = 1.0  # MHD: weight of the distillation terms
    tau: float = 1.0  # MHD: softmax temperature


def lr_factor(schedule: str, t: int, rounds: int) -> float:
    """The learning-rate multiplier at round ``t`` of ``rounds`` (0: unknown horizon, where cosine and
    linear stay at 1). ``schedule`` joins parts with "+": ``warmup:R`` (linear from 1/R over R rounds),
    ``cosine``, ``linear`` (to 0 at the last round), ``step:EVERY:FACTOR``, ``constant``."""
    factor = 1.0
    for part in schedule.split("+"):
        name, _, arg = part.strip().partition(":")
        if name in ("constant", ""):
            continue
        if name == "warmup":
            factor *= min(1.0, (t + 1) / max(1, int(arg)))
        elif name == "cosine":
            factor *= 0.5 * (1 + math.cos(math.pi * t / rounds)) if rounds > 0 else 1.0
        elif name == "linear":
            factor *= max(0.0, 1 - t / rounds) if rounds > 0 else 1.0
        elif name == "step":
            every, _, mult = arg.partition(":")
            factor *= float(mult or 0.1) ** (t // max(1, int(every)))
        else:
            raise ValueError(
                f"unknown learning-rate schedule {part!r} (constant, cosine, linear, step:E:F, warmup:R)"
            )
    return factor


def stability_warning(
    hp: Hyper, algorithm: str, kind: str, peers: int, degree: int = 4, seed: int = 0
) -> str | None:
    """A one-line warning for a CDProxSGT setting known to diverge on this graph, else None."""
    if algorithm != "cdproxsgt" or peers < 2:
        return None
    from lattice.apps.gossip_sgd import topology

    graph = topology.build(kind, peers, 0, degree, seed)
    share = 1.0 - min(topology.weights_of(graph, i)[i] for i in range(peers))  # neighbours' weight
    for name, gamma, codec in (("x", hp.gamma_x, hp.codec_x), ("y", hp.gamma_y, hp.codec_y)):
        spec, _, ratio = (codec or "").partition(":")
        if spec == "topk" and float(ratio or 0.01) <= 0.1 and gamma * share > DIVERGENT_GAMMA_SHARE:
            return (
                f"cdproxsgt with gamma_{name}={gamma} and {codec} diverged in our runs on graphs where a "
                f"peer's neighbours weigh {share:.2f} ({kind}, {peers} peers): use gamma_{name} <= "
                f"{DIVERGENT_GAMMA_SHARE / share:.2f} or a larger top-k ratio"
            )
    return None
