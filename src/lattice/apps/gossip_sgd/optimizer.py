"""Gossip SGD as a library: :class:`GossipOptimizer` trains your own ``torch.nn.Module`` on your own
data from your own loop, and :class:`GossipRun` is one peer's part in a run (membership, rounds,
late joining, checkpoints, the average model at the end), which both the optimizer and
``lattice-node gossip-sgd peer`` drive.

Plain scripts use the blocking node; the run's network side lives on the node's event loop::

    from lattice import Node, NodeConfig
    from lattice.apps.gossip_sgd import GossipOptimizer, shard

    node = Node.start(NodeConfig(bootstrap=["/ip4/192.168.1.7/tcp/4001/p2p/12D3KooW..."]))
    model = MyModel()
    opt = GossipOptimizer(model.parameters(), node, run="demo", peers=4, algorithm="dsgt", lr=0.05)
    loader = DataLoader(shard(train_set, opt.rank, opt.world), batch_size=32, shuffle=True)
    for xb, yb in loader:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    opt.close()
    node.close()

The algorithms (lattice.apps.gossip_sgd.algorithms) ask for gradients (``NeedGrad``) and send
messages (``Send``); here the gradients are the ones your ``backward()`` left in ``.grad``, and
``step`` runs the algorithm until it needs the next one, exchanging with the neighbours on the way.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lattice.apps.gossip_sgd import network
from lattice.apps.gossip_sgd.algorithms import ALGORITHMS, Algorithm, NeedGrad, Round, make, needs_closure
from lattice.apps.gossip_sgd.hyper import Hyper, lr_factor, stability_warning
from lattice.errors import ConfigError

__all__ = ["CHECKPOINT_FORMAT", "GossipOptimizer", "GossipRun", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "lattice.gossip_sgd/1"


async def _sync(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a plain function on the node's loop (the CRDT and the gossip state belong to it)."""
    return fn(*args)


async def _open(
    node: Any, run: str, settings: dict, kind: str, degree: int, seed: int, timeout: float
) -> Any:
    return network.open_gossip(node, run, settings, kind, degree, seed, timeout)


def save_checkpoint(path: str | os.PathLike, algo: Algorithm, round_: int, run: str, settings: dict) -> Path:
    """The algorithm's state after ``round_`` completed rounds as a safetensors file (written to a
    temporary name, then renamed): tensors by name, and the run, round and settings as metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in algo.state().items()}
    meta = {"format": CHECKPOINT_FORMAT, "run": run, "round": str(round_), "algorithm": algo.name,
            "settings": json.dumps(settings, sort_keys=True)}  # fmt: skip
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_checkpoint(
    path: str | os.PathLike, settings: dict | None = None
) -> tuple[dict[str, Tensor], int, dict]:
    """(state tensors, round, metadata) of a checkpoint; ConfigError if it is not one of ours, or was
    written with other settings than ``settings``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise ConfigError(f"{path} is not a gossip SGD checkpoint")
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"cannot read checkpoint {path}: {exc}") from None
    if settings is not None:
        saved = json.loads(meta.get("settings", "{}"))
        if saved != json.loads(json.dumps(settings)):
            diff = network.settings_diff(settings, saved)
            raise ConfigError(
                f"checkpoint {path} was written with other settings ({diff})".replace(" in the run", " in it")
            )
    return state, int(meta.get("round", "-1")), meta


class GossipRun:
    """One peer's part in run ``run``: joins in the constructor (waits up to ``wait`` s for ``peers``
    members; ConfigError if most members use other ``settings``), then drives an algorithm round by
    round, with gradients from an oracle (:meth:`run_round`) or from a training loop (:meth:`advance`).

    ``node`` is a blocking node (``Node.start(...)``). ``rank`` is this peer's place in the sorted
    membership (the data shard to use), ``world`` the number of members at the start.

    ``time_budget`` (s, 0: none): the run's clock starts when its first member starts training
    (wall clock, see :meth:`elapsed`); the first peer to end a round past the budget fixes the run's
    last round (``network.STOP_LEAD`` rounds ahead, in the run's document), and every peer stops
    after it (:meth:`finished`), so nobody waits for a neighbour that stopped.
    """

    def __init__(
        self,
        node: Any,
        run: str,
        *,
        settings: dict,
        peers: int = 1,
        topology: str = "ring",
        degree: int = 4,
        seed: int = 0,
        rounds: int = 0,
        timeout: float = 10.0,
        wait: float = 60.0,
        late: bool = False,
        time_budget: float = 0.0,
    ) -> None:
        if not hasattr(node, "run") or not hasattr(node, "node"):
            raise ConfigError("GossipRun needs a blocking node: Node.start(NodeConfig(...))")
        self.node = node
        self.name, self.settings, self.rounds = run, settings, rounds
        self.gossip = node.run(_open, node.node, run, settings, topology, degree, seed, timeout)
        self.late = late
        self.first, self.members = node.run(network.join_run, self.gossip, peers, wait, late)
        self.me = self.gossip.me
        self.rank = self.members.index(self.me) % max(1, peers) if self.me in self.members else 0
        self.world = len(self.members)
        self.round = self.first
        self.time_budget = time_budget
        self.started = time.time()  # the run's clock (wall-clock time): set by attach, refined per round
        self.stop: int | None = None  # the run's last round once its time budget is spent
        self.algo: Algorithm | None = None
        self.emit: Callable[[dict], None] = lambda rec: None  # log records (membership, checkpoints)
        self.checkpoint_path: Path | None = None
        self.checkpoint_every = 0
        self.joined_from: dict | None = None  # where a late joiner's model came from
        self._gen: Round | None = None
        self._live: set[str] = set()

    # -- setup
    def attach(
        self,
        algo: Algorithm,
        state: dict[str, Tensor] | None = None,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
    ) -> None:
        """Drive ``algo`` from now on: restore ``state`` (a resumed checkpoint), or, when joining late,
        start from a live neighbour's current model (fetched through the content store)."""
        self.algo = algo
        self.checkpoint_path = Path(checkpoint) if checkpoint else None
        self.checkpoint_every = checkpoint_every
        self.gossip.snapshot_source = self._snapshot
        if state is not None:
            algo.load_state(state)
            self.joined_from = {"from": "checkpoint"}
        elif self.late:
            got = self.node.run(network.pull_snapshot, self.gossip, self.first)
            if got is not None and got[2].size == algo.x.shape[1]:
                peer, round_, x = got
                algo.load_state({"x": torch.from_numpy(x).view(1, -1)})
                if hasattr(algo, "x_hat"):  # our reference starts where our model does
                    algo.load_state({"x_hat": torch.from_numpy(x).view(1, -1)})
                self.joined_from = {"from": "neighbour", "peer": peer, "model_round": round_}
        self._live = set(self.on_loop(self.gossip.live, self.first))
        self.started = self.on_loop(self.gossip.start_clock)
        if self.joined_from:
            self.emit({"event": "joined", "round": self.first, **self.joined_from})

    def _snapshot(self) -> tuple[int, np.ndarray]:
        """(round, our model) for a late joiner: called on the node's loop, reads the current tensor."""
        assert self.algo is not None
        return self.round, self.algo.x[0].detach().float().cpu().numpy().copy()

    def on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the node's loop (the gossip state and the run's document live there)."""
        return self.node.run(_sync, fn, *args)

    # -- rounds
    def _start_round(self) -> Round:
        assert self.algo is not None
        now = set(self.on_loop(self.gossip.live, self.round))
        if self._live - now:  # a peer left the graph this round (GRACE rounds after it was seen dead)
            self.algo.membership_changed()
            self.emit({"event": "membership", "round": self.round, "left": sorted(self._live - now)})
        self._live = now
        self._gen = self.algo.round(self.round)
        return self._gen

    def elapsed(self) -> float:
        """Seconds on the run's clock (since its first member started training, after joining and
        loading its data; wall clock, so peers on other machines need synchronized clocks, as NTP
        gives, for a time budget to mean the same)."""
        return time.time() - self.started

    def finished(self) -> bool:
        """Whether this peer's part is over: ``rounds`` done, or the time budget's last round."""
        return (self.rounds > 0 and self.round >= self.rounds) or (
            self.stop is not None and self.round > self.stop
        )

    def _end_round(self) -> None:
        assert self.algo is not None
        t = self.round
        self.started = self.on_loop(self.gossip.run_start)
        if self.time_budget > 0:
            if self.elapsed() > self.time_budget:
                self.stop = self.on_loop(self.gossip.propose_stop, t)
            else:
                self.stop = self.on_loop(self.gossip.stop_round)
        last = (self.rounds > 0 and t == self.rounds - 1) or t == self.stop
        self.on_loop(self.gossip.progress, t, last)
        self.round = t + 1
        self._gen = None
        if self.checkpoint_every and self.checkpoint_path and self.round % self.checkpoint_every == 0:
            self.save(self.checkpoint_path)

    def exchange(self, send: Any) -> Any:
        return self.node.run(self.gossip.exchange, self.round, send)

    def run_round(self, oracle: Callable[[NeedGrad], tuple[Tensor, Tensor]]) -> int:
        """Run the current round with gradients from ``oracle``; returns the round just run."""
        t = self.round
        gen, value = self._gen or self._start_round(), None
        while True:
            try:
                request = gen.send(value)
            except StopIteration:
                break
            value = oracle(request) if isinstance(request, NeedGrad) else self.exchange(request)
        self._end_round()
        return t

    def advance(self, value: Any, answer: Callable[[NeedGrad], Any]) -> NeedGrad:
        """Resume the algorithm with ``value`` (None to start), through messages, rounds and the
        gradient requests ``answer`` takes (a non-None answer), up to the one it leaves to the caller."""
        while True:
            gen = self._gen or self._start_round()
            try:
                request = gen.send(value)
            except StopIteration:
                self._end_round()
                value = None
                continue
            if isinstance(request, NeedGrad):
                value = answer(request)
                if value is None:
                    return request
            else:
                value = self.exchange(request)

    # -- checkpoints and the end of a run
    def save(self, path: str | os.PathLike) -> Path:
        """A checkpoint of the state now, with the number of rounds completed (see
        :func:`save_checkpoint`; taken within a round, it holds that round's partial state)."""
        assert self.algo is not None
        written = save_checkpoint(path, self.algo, self.round, self.name, self.settings)
        self.emit({"event": "checkpoint", "round": self.round, "path": str(written)})
        return written

    def summary(self) -> dict:
        return network.summary(self.gossip, self.rank)

    def finish(self, evaluate: Callable[[Tensor], dict] | None = None, linger: float = 15.0) -> dict | None:
        """Publish our final progress and model, serve until the other live peers finished (up to
        ``linger`` s), then the run's average model: the first live peer fetches every live peer's
        final model and ``evaluate(models [m, d])`` gives the record (e.g. accuracy of the mean,
        consensus distance), which every peer receives. Returns it (None without ``evaluate``)."""
        assert self.algo is not None
        last = self.round - 1
        self.on_loop(self.gossip.progress, last, True)
        self.node.run(network.publish_final, self.gossip, self.algo.x[0].detach().float().cpu().numpy())
        self.node.run(network.linger, self.gossip, last + 1, linger)
        if evaluate is None:
            return None
        live = self.on_loop(self.gossip.live, last + 1)
        rec = None
        if live and live[0] == self.me:
            rows = self.node.run(network.collect_finals, self.gossip, live, linger)
            if rows and len({r.size for r in rows}) == 1:
                models = torch.from_numpy(np.stack(rows)).to(self.algo.x.device)
                rec = {"round": last + 1, "peers": len(rows), "of_live": len(live), **evaluate(models)}
        return self.node.run(network.share_average, self.gossip, live, rec, linger + network.FETCH_TIMEOUT)


def consensus(models: Tensor) -> float:
    """(1/m) sum_i ||x_i - x_bar||^2: how far the models are from their average."""
    return float(((models - models.mean(0)) ** 2).sum(1).mean())


class GossipOptimizer:
    """Decentralized training of ``params`` with the peers of run ``run``: call :meth:`step` after
    each ``backward()``, as with a torch optimizer; the algorithm decides when to talk to the
    neighbours (every step, every ``local_steps`` steps, ...) and does so inside ``step``.

    Hyper-parameters are :class:`lattice.apps.gossip_sgd.hyper.Hyper` fields, given as keywords
    (``lr=0.05, momentum=0.9, weight_decay=5e-4, clip=1.0, lr_schedule="warmup:5+cosine",
    local_steps=10``) or as ``hyper``. Every peer of a run must use the same algorithm, topology,
    hyper-parameters, ``rounds``, ``peers`` and model size (and ``settings``, anything else you want
    checked, e.g. the dataset's name): a peer that differs from the majority is refused (ConfigError).

    ``checkpoint``: a safetensors file written every ``checkpoint_every`` rounds (and by
    :meth:`save`); ``resume=True`` restarts from it (joining the run again, late). ``late=True``:
    join a run in progress, starting from a live neighbour's current model. SAM algorithms (dfedsam,
    dfedsam_mgs) need ``step(closure)``: the closure recomputes the loss and the gradients at the
    (perturbed) parameters it finds in the model. MHD is not available here (it distils through the
    built-in multi-head MLP: ``lattice-node gossip-sgd``).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        node: Any,
        *,
        run: str = "default",
        peers: int = 1,
        algorithm: str = "dsgt",
        topology: str = "ring",
        degree: int = 4,
        seed: int = 0,
        rounds: int = 0,
        hyper: Hyper | None = None,
        timeout: float = 10.0,
        wait: float = 60.0,
        late: bool = False,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        resume: bool = False,
        settings: dict | None = None,
        **hyper_fields: Any,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ConfigError("GossipOptimizer got no parameters that require gradients")
        if algorithm not in ALGORITHMS or algorithm == "mhd":
            known = ", ".join(a for a in ALGORITHMS if a != "mhd")
            raise ConfigError(f"algorithm {algorithm!r}: GossipOptimizer runs {known}")
        try:
            hp = dataclasses.replace(hyper or Hyper(), **hyper_fields)
            lr_factor(hp.lr_schedule, 0, rounds)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"GossipOptimizer: {exc}") from None
        self.algorithm, self.hp = algorithm, hp
        unstable = stability_warning(hp, algorithm, topology, peers, degree, seed)
        if unstable:
            warnings.warn(unstable, stacklevel=2)
        x0 = torch.nn.utils.parameters_to_vector(self.params).detach().clone()
        run_settings = {"algorithm": algorithm, "topology": topology, "degree": degree, "seed": seed,
                        "rounds": rounds, "peers": peers, "dim": x0.numel(), "hp": dataclasses.asdict(hp),
                        "user": settings or {}}  # fmt: skip
        state = None
        if resume and checkpoint is not None and Path(checkpoint).is_file():
            state, _, _ = load_checkpoint(checkpoint, run_settings)
        self.run = GossipRun(node, run, settings=run_settings, peers=peers, topology=topology, degree=degree,
                             seed=seed, rounds=rounds, timeout=timeout, wait=wait,
                             late=late or state is not None)  # fmt: skip
        self.run.attach(make(algorithm, hp, x0, 1, rounds), state, checkpoint, checkpoint_every)
        self._closure: Callable[[], Any] | None = None
        self._pending = self.run.advance(None, self._answer)
        self._write(self._pending.params[0])

    # -- what a training loop sees
    @property
    def rank(self) -> int:
        """This peer's data shard (its place in the sorted membership at the start)."""
        return self.run.rank

    @property
    def world(self) -> int:
        """Members of the run at the start (shards to split the data into)."""
        return self.run.world

    @property
    def round(self) -> int:
        """The round in progress (a round is ``local_steps`` steps for every built-in algorithm)."""
        return self.run.round

    @property
    def lr(self) -> float:
        """The learning rate of the current round (after the schedule)."""
        assert self.run.algo is not None
        return self.run.algo.lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def step(self, closure: Callable[[], Any] | None = None) -> float | None:
        """Take the gradients in ``.grad`` (at the parameters the model holds now), run the algorithm
        up to its next gradient (mixing with the neighbours when it says so) and put the new
        parameters in the model. ``closure``: SAM's second gradient (see the class)."""
        if needs_closure(self.algorithm) and closure is None:
            raise ConfigError(f"{self.algorithm} takes two gradients per step: call step(closure)")
        self._closure = closure
        value = (torch.full((1,), math.nan), self._grads().unsqueeze(0))
        self._pending = self.run.advance(value, self._answer)
        self._write(self._pending.params[0])
        return None

    def save(self, path: str | os.PathLike) -> Path:
        """A checkpoint now (safetensors; :func:`load_checkpoint` reads it, ``resume=True`` uses it)."""
        return self.run.save(path)

    def close(self, evaluate: Callable[[Tensor], dict] | None = None, linger: float = 15.0) -> dict | None:
        """End this peer's part: serve the neighbours until they finish too (up to ``linger`` s).
        ``evaluate(models)`` (flat parameter rows of every live peer, [m, d]) gives the run's
        "average" record, computed by one peer and returned to all (see :meth:`GossipRun.finish`)."""
        return self.run.finish(evaluate, linger)

    def average_parameters(self, models: Tensor) -> None:
        """Put the mean of ``models`` [m, d] into the model's parameters (e.g. inside ``evaluate``)."""
        self._write(models.mean(0))

    # -- internals
    def _grads(self) -> Tensor:
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params]
        return torch.cat(parts).detach().float()

    def _write(self, flat: Tensor) -> None:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat.to(self.params[0].dtype), self.params)

    def _answer(self, request: NeedGrad) -> Any:
        """The gradients the optimizer computes itself (SAM's second one, through the closure);
        None: the training loop's next ``backward()`` gives it."""
        if not request.same_batch:
            return None
        assert self._closure is not None
        self._write(request.params[0])
        with torch.enable_grad():
            loss = self._closure()
        value = (
            float(loss.detach()) if isinstance(loss, Tensor) else math.nan if loss is None else float(loss)
        )
        return torch.full((1,), value), self._grads().unsqueeze(0)
