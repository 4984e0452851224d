"""The algorithms' names and hyper-parameters: plain data, no torch, so that building the command line
(`lattice-node --help` lists the gossip-sgd commands) stays cheap."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ALGORITHMS", "Hyper"]

ALGORITHMS = ("dpsgd", "dfedavg", "dfedsam", "dfedsam_mgs", "dsgt", "dproxsgt", "cdproxsgt", "mhd")


@dataclass
class Hyper:
    lr: float = 0.05
    batch: int = 32
    local_steps: int = 10  # K: gradient steps per round (the budget every algorithm gets)
    rho: float = 0.01  # SAM radius
    mgs_steps: int = 4  # Q gossip steps per round (DFedSAM-MGS)
    l1: float = 0.0  # lambda of the proximal L1 term (DProxSGT / CDProxSGT)
    clip: float = 0.0  # gradient norm clip for tracking (0: off; the DProxSGT code uses 10)
    gamma_x: float = 0.5  # CDProxSGT consensus step sizes
    gamma_y: float = 0.5
    codec_x: str | None = "topk:0.1"  # CDProxSGT compressors (tuned: bench/gossip_sgd_sim.py)
    codec_y: str | None = "topk:0.1"
    codec: str | None = None  # codec for the plain-gossip algorithms' model messages
    heads: int = 3  # MHD: auxiliary heads
    public_batch: int = 256  # MHD: public samples whose logits are exchanged per round
    nu: float = 1.0  # MHD: weight of the distillation terms
    tau: float = 1.0  # MHD: softmax temperature
