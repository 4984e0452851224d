"""One run's configuration, data preparation and metrics, shared by the simulator and the network."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

from lattice.apps.gossip_sgd import algorithms, data
from lattice.apps.gossip_sgd.algorithms import Algorithm, BatchOracle, Hyper, LocalData
from lattice.apps.gossip_sgd.models import MLP, FlatModel, ModuleModel, accuracy, small_cnn
from lattice.apps.gossip_sgd.simulator import Simulator, drive

MODELS = ("mlp", "mlp:WIDTH", "cnn")
MAX_MLP_WIDTH = 16384  # mlp:WIDTH hidden units per layer (a 16384-wide MLP is ~285M parameters)


@dataclass
class Config:
    algorithm: str = "dsgt"
    peers: int = 16
    topology: str = "ring"
    degree: int = 4  # for random-regular / random
    split: str = "dirichlet"  # or "label-skew"
    alpha: float = 0.3
    classes_per_peer: int = 2
    rounds: int = 100
    seed: int = 0
    data_dir: str | None = None
    train_limit: int = 0  # use only the first N training samples (0: all); tests use a slice
    test_limit: int = 0
    eval_every: int = 10
    public: int = 10000  # MHD: training samples held out as the public unlabelled set
    model: str = "mlp"  # mlp (784-200-200-10), mlp:WIDTH (784-WIDTH-WIDTH-10) or cnn (models.small_cnn)
    device: str = "cpu"  # where tensors live and compute runs (cuda, cuda:1, ...): resolve_device
    time_budget: float = 0.0  # network peers: stop after the round that ends past it (s; 0: rounds only)
    hp: Hyper = field(default_factory=Hyper)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prepared:
    model: FlatModel
    local: LocalData
    test_x: Tensor
    test_y: Tensor
    public: Tensor | None
    x0: Tensor
    sizes: list[int]
    oracle: BatchOracle


def resolve_device(name: str) -> torch.device:
    """``auto``: cuda when present, else the CPU; a cuda device asked for but absent is a ConfigError."""
    from lattice.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (cpu, cuda, cuda:N, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: torch sees no CUDA device here (use cpu, or auto)")
    return device


def make_model(cfg: Config) -> FlatModel:
    if cfg.model == "cnn":
        if cfg.algorithm == "mhd":
            raise ValueError("mhd needs the multi-head MLP (--model mlp)")
        return ModuleModel(small_cnn).to(resolve_device(cfg.device))
    return algorithms_model(cfg)


def mlp_width(spec: str) -> int:
    """Hidden width of a model spec ``mlp`` (200) or ``mlp:WIDTH``; ValueError for anything else."""
    name, sep, width = spec.partition(":")
    if name != "mlp" or (sep and not width.isdigit()):
        raise ValueError(f"unknown model {spec!r} (known: {', '.join(MODELS)})")
    value = int(width) if sep else 200
    if not 1 <= value <= MAX_MLP_WIDTH:
        raise ValueError(f"model {spec!r}: the width must be in [1, {MAX_MLP_WIDTH}]")
    return value


def algorithms_model(cfg: Config) -> MLP:
    width = mlp_width(cfg.model)
    return MLP((784, width, width, 10), heads=cfg.hp.heads + 1 if cfg.algorithm == "mhd" else 1)


def prepare(cfg: Config, rows: Sequence[int] | None = None) -> Prepared:
    """Data shards of ``rows`` (default: all peers) and everything an algorithm needs to start."""
    ds = data.load_fashion_mnist(cfg.data_dir)
    tx, ty = ds.train_x, ds.train_y
    if cfg.train_limit:
        tx, ty = tx[: cfg.train_limit], ty[: cfg.train_limit]
    ex, ey = ds.test_x, ds.test_y
    if cfg.test_limit:
        ex, ey = ex[: cfg.test_limit], ey[: cfg.test_limit]
    pool = np.arange(len(ty))
    public = None
    if cfg.algorithm == "mhd":
        pool, pub = data.public_split(len(ty), min(cfg.public, len(ty) // 5), cfg.seed)
        public = torch.from_numpy(tx[pub])
    if cfg.split == "dirichlet":
        parts = data.dirichlet_split(ty[pool], cfg.peers, cfg.alpha, cfg.seed)
    elif cfg.split == "label-skew":
        parts = data.label_skew_split(ty[pool], cfg.peers, cfg.classes_per_peer, cfg.seed)
    else:
        raise ValueError(f"unknown split {cfg.split!r} (dirichlet, label-skew)")
    parts = [pool[p] for p in parts]
    rows = list(range(cfg.peers)) if rows is None else list(rows)
    device = resolve_device(cfg.device)
    model = make_model(cfg)
    shards = [parts[r] for r in rows]
    local = LocalData(torch.from_numpy(tx), torch.from_numpy(ty), shards, cfg.seed + 1 + rows[0])
    return Prepared(
        model,
        local,
        torch.from_numpy(ex),
        torch.from_numpy(ey),
        public,
        model.init(cfg.seed).to(device),
        [len(parts[r]) for r in rows],
        BatchOracle(model, local, cfg.hp.batch, device),
    )


def build(cfg: Config, prep: Prepared) -> Algorithm:
    kw = {}
    if cfg.algorithm == "mhd":
        kw = {"model": prep.model, "data": prep.local, "public": prep.public, "seed": cfg.seed}
    return algorithms.make(cfg.algorithm, cfg.hp, prep.x0, len(prep.sizes), cfg.rounds, **kw)


def evaluate(algo: Algorithm, prep: Prepared, local_limit: int = 0, average: bool = True) -> dict:
    """acc of the average model, mean acc of the local models, consensus (1/m) sum ||x_i - x_bar||^2.
    ``average=False``: no average model (a network peer holds one row: it would be its own model on
    the whole test set, the costliest part of an evaluation for a large model)."""
    x = algo.models()
    tx, ty = prep.test_x, prep.test_y
    out: dict = {}
    lx, ly = (tx[:local_limit], ty[:local_limit]) if local_limit else (tx, ty)
    if algo.name == "mhd":  # weights never leave a peer: no average model; report every head
        heads = [float(accuracy(prep.model, x, lx, ly, head=h).mean()) for h in range(prep.model.heads)]
        out["acc_avg"] = None
        out["acc_local"] = max(heads)
        out["acc_heads"] = heads
    else:
        if average:
            out["acc_avg"] = float(accuracy(prep.model, x.mean(0, keepdim=True), tx, ty)[0])
        out["acc_local"] = float(accuracy(prep.model, x, lx, ly).mean())
    out["consensus"] = float(((x - x.mean(0)) ** 2).sum(1).mean())
    return out


def simulate(
    cfg: Config,
    on_record: Callable[[dict], None] | None = None,
    progress: bool = False,
) -> list[dict]:
    """Run ``cfg`` with all peers in this process; one record per evaluation (and the last round)."""
    torch.manual_seed(cfg.seed)
    prep = prepare(cfg)
    algo = build(cfg, prep)
    sim = Simulator(cfg.peers, cfg.topology, cfg.degree, cfg.seed, device=resolve_device(cfg.device))
    records: list[dict] = []
    started = time.perf_counter()
    bar = _progress(progress, cfg)
    for t in range(cfg.rounds):
        drive(algo.round(t), lambda send, t=t: sim.exchange(t, send), prep.oracle)
        last = t == cfg.rounds - 1
        if last or (cfg.eval_every and (t + 1) % cfg.eval_every == 0):
            rec = {
                "algorithm": cfg.algorithm,
                "round": t + 1,
                "loss": algo.last_loss,
                **evaluate(algo, prep, 0 if last else 2000),
                "bytes_per_peer": float(sim.bytes_sent.mean()),
                "gradients": algo.gradients,
                "seconds": time.perf_counter() - started,
            }
            records.append(rec)
            if on_record:
                on_record(rec)
        if bar:
            acc = records[-1].get("acc_avg") or records[-1].get("acc_local") if records else None
            shown = f" acc {acc:.3f} (round {records[-1]['round']})" if acc is not None else ""
            bar[0].update(bar[1], advance=1, description=f"{cfg.algorithm} loss {algo.last_loss:.3f}{shown}")
    if bar:
        bar[0].stop()
    return records


def _progress(enabled: bool, cfg: Config):
    if not enabled:
        return None
    from rich.progress import Progress

    p = Progress(transient=False)
    p.start()
    return p, p.add_task(cfg.algorithm, total=cfg.rounds)


def json_line(rec: dict) -> str:
    return json.dumps(rec, sort_keys=True)
