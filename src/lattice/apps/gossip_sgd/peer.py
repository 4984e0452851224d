"""``gossip-sgd peer``: one peer process of a run, a thin user of :class:`GossipRun` (the library):
a blocking node, this peer's Fashion-MNIST shard, gradients from the batch oracle of the simulator's
flat model, a JSON log, checkpoints and the average model at the end."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lattice.apps.gossip_sgd import network
from lattice.apps.gossip_sgd.experiment import Config, Prepared, build, evaluate, prepare, resolve_device
from lattice.apps.gossip_sgd.models import accuracy
from lattice.apps.gossip_sgd.optimizer import GossipRun, consensus, load_checkpoint

CHECKPOINT = "checkpoint.safetensors"


def run(args: argparse.Namespace) -> dict:
    """Join run ``args.run``, train ``args.rounds`` rounds (or up to the last round of the run's time
    budget, ``--time-budget``), finish; returns the "done" summary."""
    from lattice.apps.gossip_sgd.options import config_from, warn_unstable
    from lattice.cli import node_config, write_atomic
    from lattice.node import BlockingNode
    from lattice.plugins import build_node

    torch.set_num_threads(args.threads)
    cfg = config_from(args)
    resolve_device(cfg.device)  # a missing cuda is refused before the node starts
    warn_unstable(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = network.run_settings(cfg)
    ckpt = out / CHECKPOINT
    state = load_checkpoint(ckpt, settings)[0] if args.resume and ckpt.is_file() else None
    config = node_config(args, listen=[network.LOOPBACK], data_dir=out / "node", control=False)
    async_node = build_node(config)  # its dashboard carries our panel
    with network.RunLog(out / "log.jsonl") as log, BlockingNode(async_node) as node:
        if args.addr_file:
            write_atomic(args.addr_file, node.addrs[0] + "\n", what="address file")
        network.announce_address(node)
        run_ = GossipRun(node, args.run, settings=settings, peers=cfg.peers, topology=cfg.topology,
                         degree=cfg.degree, seed=cfg.seed, rounds=cfg.rounds, timeout=args.timeout,
                         wait=args.wait, late=args.late or state is not None,
                         time_budget=cfg.time_budget)  # fmt: skip
        run_.emit = log.emit
        log.emit({"event": "start", "peer": run_.me, "rank": run_.rank, "members": run_.world,
                  "first": run_.first, "device": str(resolve_device(cfg.device))})  # fmt: skip
        prep = prepare(cfg, [run_.rank])
        algo = build(cfg, prep)
        run_.attach(algo, state, ckpt, args.checkpoint_every)
        bar = Progress(args.progress, cfg, run_.first)
        while not run_.finished():
            t = run_.run_round(prep.oracle)
            last = run_.finished()
            rec = None
            if cfg.eval_every and ((t + 1) % cfg.eval_every == 0 or last):
                rec = round_record(run_, prep, t, last)
                log.emit(rec)
                panel = async_node.dashboard.panel(
                    "gossip-sgd", title=f"gossip SGD run {args.run}", unit="accuracy"
                )
                run_.on_loop(panel.push, "local accuracy", t + 1, rec["acc_local"])
            bar.update(t, algo.last_loss, rec)
        bar.close()
        save_model(out / "model.safetensors", algo.models()[0])
        done = run_.summary()
        log.emit(done)
        avg = run_.finish(None if cfg.algorithm == "mhd" else average_evaluator(prep), args.linger)
        if avg is not None:
            log.emit({"event": "average", **avg})
    return done


def round_record(run_: GossipRun, prep: Prepared, t: int, last: bool) -> dict:
    """This peer's own model after round ``t`` (``acc_local``: 2000 test samples, all at the last
    round); the network's average model is evaluated once, at the end ("average" record)."""
    assert run_.algo is not None
    metrics = evaluate(run_.algo, prep, 0 if last else 2000, average=False)
    stats = run_.gossip.stats
    return {
        "event": "round", "round": t + 1, "t_s": round(run_.elapsed(), 2), "loss": run_.algo.last_loss,
        "acc_local": metrics["acc_local"],
        **({"acc_heads": metrics["acc_heads"]} if "acc_heads" in metrics else {}),
        "lr": run_.algo.lr, "bytes_sent": stats.bytes_sent, "live": len(run_.on_loop(run_.gossip.live, t)),
        "timeouts": stats.timeouts,
    }  # fmt: skip


def average_evaluator(prep: Prepared):
    """``evaluate(models)`` for GossipRun.finish: accuracy of the mean model and consensus distance,
    named as in the simulator's records."""

    def evaluate_(models: torch.Tensor) -> dict:
        acc = float(accuracy(prep.model, models.mean(0, keepdim=True), prep.test_x, prep.test_y)[0])
        return {"acc_avg": acc, "consensus": consensus(models)}

    return evaluate_


def save_model(path: Path, x: torch.Tensor) -> None:
    """The final flat model as safetensors ("x": float32 [d])."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"x": x.detach().float().cpu().contiguous()}, str(tmp))
    tmp.replace(path)


class Progress:
    """A progress line on stderr (rich, when it is a terminal): round, loss, last local accuracy."""

    def __init__(self, enabled: bool, cfg: Config, first: int) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import Progress as Bar

            self.bar = Bar(transient=False)
            self.bar.start()
            self.task = self.bar.add_task(cfg.algorithm, total=cfg.rounds, completed=first)
        self.acc: float | None = None

    def update(self, t: int, loss: float, rec: dict | None) -> None:
        if rec is not None:
            self.acc = rec["acc_local"]
        if self.bar is None:
            return
        acc = f" acc {self.acc:.3f}" if self.acc is not None else ""
        self.bar.update(self.task, completed=t + 1, description=f"round {t + 1} loss {loss:.3f}{acc}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
