"""The real network: one process per peer, the same algorithm generators, messages over ``node.rpc``.

Only a node's public services are used, as a third party would:

* discovery: every peer puts its address in the DHT under ``gossip_sgd/<run>/members`` (one entry
  per publisher) and connects to the others it finds there;
* membership: a CRDT document ``gossip_sgd/<run>`` holds ``members`` (peer -> first round it takes
  part in), ``dead`` (peer -> round it was seen gone) and ``progress`` (peer -> last round done);
  the graph of a round is derived from the sorted live members, so all peers agree without talking;
* exchange: ``gossip_sgd.exchange`` carries one phase's tensors (RPC codecs for compression). The
  receiver keys messages by (run, round, phase, sender) with the sender taken from the authenticated
  connection, so a duplicate is never applied twice and a late one is refused. A peer waits for its
  neighbours up to a timeout, then mixes over those that answered (weights re-normalized: the
  missing weight stays on itself). A neighbour whose call fails is marked dead in the CRDT.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import trio
from torch import Tensor

from lattice.apps.gossip_sgd import topology
from lattice.apps.gossip_sgd.algorithms import Algorithm, Send
from lattice.apps.gossip_sgd.compress import wire_bytes
from lattice.apps.gossip_sgd.experiment import Config, Prepared, build, evaluate, prepare
from lattice.codec import compression

if TYPE_CHECKING:
    from lattice.node import Node

METHOD = "gossip_sgd.exchange"
MAX_PAYLOAD = 256 << 20  # one phase's tensors (models up to ~64M float32 parameters, uncompressed)
MAX_PHASE = 64
WINDOW = 3  # rounds ahead of ours we buffer; anything further (or older) is refused
# Progress is written at most every PROGRESS_EVERY rounds unless a second has passed (and always at
# the last round): each write is a CRDT update every peer applies and stores, 11 % of a fast round.
PROGRESS_EVERY = 4
PROGRESS_INTERVAL = 1.0


@dataclass
class NetReceived:
    """The neighbours' decoded rows for one phase, and the mixing weights of those that answered."""

    own: dict[str, Tensor]  # [1, ...]
    decoded_own: dict[str, Tensor]
    weights: dict[str, float]  # peer id -> w_ij of neighbours that answered
    self_weight: float
    rows: dict[str, dict[str, Tensor]]  # peer id -> name -> tensor [...]
    self_exact: bool

    def sent(self, name: str) -> Tensor:
        return self.decoded_own[name]

    def mix(self, name: str) -> Tensor:
        own = self.own[name] if self.self_exact else self.decoded_own[name]
        out = own * self.self_weight
        for peer, w in self.weights.items():
            out.add_(self.rows[peer][name].unsqueeze(0), alpha=w)
        return out

    def neighbours(self, name: str) -> list[list[Tensor]]:
        return [[self.rows[p][name] for p in sorted(self.weights)]]


@dataclass
class Stats:
    bytes_sent: int = 0
    messages_sent: int = 0
    timeouts: int = 0
    duplicates: int = 0
    refused: int = 0
    exchange_s: list[float] = field(default_factory=list)


class Gossip:
    """Delivers :class:`Send` phases between peer processes; one instance per peer and run."""

    def __init__(
        self,
        node: Node,
        run: str,
        kind: str = "ring",
        degree: int = 4,
        seed: int = 0,
        timeout: float = 10.0,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        self.node, self.run, self.kind, self.degree, self.seed = node, run, kind, degree, seed
        self.timeout = timeout
        self.me = str(node.peer_id)
        # membership and progress are rebuilt by anti-entropy after a crash: no fsync per update (a
        # blocking fsync per neighbour's progress write stalled the event loop, 5 % of a round)
        self.doc = node.crdt.open(f"gossip_sgd/{run}", fsync="batch")
        self.round = 0
        self.stats = Stats()
        self._inbox: dict[tuple[int, str, str], dict[str, np.ndarray]] = {}
        self._seen: set[tuple[int, str, str]] = set()
        self._arrived = trio.Condition()
        self._dead: set[str] = set()
        self._progress_at = (-PROGRESS_EVERY, -math.inf)  # (round, monotonic time) last written
        node.rpc.register(METHOD, self._handle, max_payload=max_payload)

    # -- membership (CRDT) and discovery (DHT)
    def join(self, first_round: int = 0) -> None:
        members = self.doc.get_map("members")
        if self.me not in members:
            members[self.me] = first_round

    def members(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.doc.get_map("members").items()}

    def dead(self) -> set[str]:
        return set(map(str, self.doc.get_map("dead").keys())) | self._dead

    def live(self, round_: int) -> list[str]:
        """Sorted members taking part in ``round_`` (joined by then, not known dead)."""
        dead = self.dead()
        return sorted(p for p, start in self.members().items() if start <= round_ and p not in dead)

    def mark_dead(self, peer: str) -> None:
        if peer in self._dead or peer == self.me:
            return
        self._dead.add(peer)
        dead = self.doc.get_map("dead")
        if peer not in dead:
            dead[peer] = self.round

    def progress(self, round_: int, final: bool = False) -> None:
        """Publish the last round done; coalesced (see PROGRESS_EVERY), so it may lag a few rounds."""
        last_round, last_time = self._progress_at
        now = time.monotonic()
        if final or round_ - last_round >= PROGRESS_EVERY or now - last_time >= PROGRESS_INTERVAL:
            self.doc.get_map("progress")[self.me] = round_
            self._progress_at = (round_, now)

    def furthest_round(self) -> int:
        return max((int(v) for v in self.doc.get_map("progress").values()), default=-1)

    async def announce(self) -> None:
        addrs = [a for a in self.node.addrs if "/p2p/" in a] or self.node.addrs
        await self.node.dht.put(f"gossip_sgd/{self.run}/members", addrs[0], ttl=3600)

    async def discover(self) -> int:
        """Connect to every peer announced in the DHT; returns how many are known."""
        try:
            entries = await self.node.dht.get(f"gossip_sgd/{self.run}/members")
        except Exception:
            return 0
        connected = {p["peer_id"] for p in await self.node.peers()}
        for e in entries:
            if e.publisher != self.me and e.publisher not in connected and e.publisher not in self.dead():
                with trio.move_on_after(5):
                    try:
                        await self.node.connect(e.value.decode())
                    except Exception:
                        pass
        return len(entries)

    def neighbours(self, round_: int) -> tuple[dict[str, float], float]:
        live = self.live(round_)
        if self.me not in live:
            live = sorted([*live, self.me])
        graph = topology.build(self.kind, len(live), round_, self.degree, self.seed)
        i = live.index(self.me)
        row = topology.weights_of(graph, i)
        return {live[j]: w for j, w in row.items() if j != i}, row[i]

    # -- receiving
    async def _handle(self, payload: Any, ctx: Any) -> str:
        sender = str(ctx.peer)
        if not isinstance(payload, dict) or payload.get("run") != self.run:
            self.stats.refused += 1
            return "refused"
        rnd, phase, tensors_ = payload.get("round"), payload.get("phase"), payload.get("tensors")
        if (
            not isinstance(rnd, int)
            or not isinstance(phase, str)
            or len(phase) > MAX_PHASE
            or not isinstance(tensors_, dict)
            or not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in tensors_.items())
            or sender not in self.members()
        ):
            self.stats.refused += 1
            return "refused"
        key = (rnd, phase, sender)
        if key in self._seen:  # a retry or a replay: never applied twice
            self.stats.duplicates += 1
            return "duplicate"
        if not self.round <= rnd <= self.round + WINDOW:
            self.stats.refused += 1
            return "late" if rnd < self.round else "refused"
        self._seen.add(key)
        self._inbox[key] = tensors_
        async with self._arrived:
            self._arrived.notify_all()
        return "ok"

    # -- one phase
    async def exchange(self, round_: int, send: Send) -> NetReceived:
        started = time.perf_counter()
        if round_ != self.round:
            self.round = round_
            self._inbox = {k: v for k, v in self._inbox.items() if k[0] >= round_}
            self._seen = {k for k in self._seen if k[0] >= round_ - 1}
        weights, _self_weight = self.neighbours(round_)
        payload_t: dict[str, Any] = {}
        own, decoded_own = {}, {}
        numel = 0
        for name, t in send.tensors.items():
            row = t.detach().reshape(-1).float().contiguous()
            codec = send.codecs.get(name)
            numel += row.numel()
            arr = row.numpy()
            if codec is None:
                payload_t[name] = arr
                decoded_own[name] = t
            else:
                c = compression.compress(codec, arr)
                payload_t[name] = c
                dec, _ = compression.decompress(codec, c.data, c.meta, arr.size)
                decoded_own[name] = torch.from_numpy(dec).view(t.shape)
            own[name] = t
        payload = {"run": self.run, "round": round_, "phase": send.phase, "tensors": payload_t}
        size = sum(wire_bytes(send.codecs.get(n), t.numel() // t.shape[0]) for n, t in send.tensors.items())
        answered: dict[str, dict[str, Tensor]] = {}
        deadline = trio.current_time() + self.timeout

        async def push(peer: str) -> None:
            try:
                with trio.fail_after(self.timeout):
                    await self.node.rpc.call(peer, METHOD, payload, timeout=self.timeout)
                self.stats.bytes_sent += size
                self.stats.messages_sent += 1
            except Exception:
                self.mark_dead(peer)
                async with self._arrived:
                    self._arrived.notify_all()

        async def collect() -> None:
            want = {p: send.tensors for p in weights}
            with trio.move_on_at(deadline):
                async with self._arrived:
                    while True:
                        for peer in list(want):
                            got = self._inbox.pop((round_, send.phase, peer), None)
                            if got is not None:
                                rows = _validate(got, send.tensors)
                                if rows is not None:
                                    answered[peer] = rows
                                del want[peer]
                            elif peer in self._dead:
                                del want[peer]
                        if not want:
                            return
                        await self._arrived.wait()
            self.stats.timeouts += len(want)

        async with trio.open_nursery() as nursery:
            for peer in weights:
                nursery.start_soon(push, peer)
            nursery.start_soon(collect)
        used = {p: w for p, w in weights.items() if p in answered}
        self.stats.exchange_s.append(time.perf_counter() - started)
        return NetReceived(own, decoded_own, used, 1.0 - sum(used.values()), answered, send.self_exact)


def _validate(got: dict[str, np.ndarray], expected: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """The received tensors if they match what we sent in names, sizes and dtype (else None)."""
    if set(got) != set(expected):
        return None
    out = {}
    for name, t in expected.items():
        arr = got[name]
        per_row = t.shape[1:]
        if arr.dtype != np.float32 or arr.size != math.prod(per_row):
            return None
        if not math.isfinite(float(arr.sum())):  # a NaN/inf anywhere poisons the sum (cheap check)
            return None
        if not arr.flags.writeable:
            arr = arr.copy()
        out[name] = torch.from_numpy(arr).view(per_row)
    return out


def _advance(gen: Any, value: Any) -> Send | None:
    """Run the algorithm to its next Send (None when the round is over); compute, so in a thread."""
    try:
        return gen.send(value)
    except StopIteration:
        return None


# -- one peer process
LOOPBACK = "/ip4/127.0.0.1/tcp/0"  # a peer's listen address unless --listen, the config or env says


class RunLog:
    """A peer's ``log.jsonl``: one JSON object per line, with the seconds since it was opened ("t")."""

    def __init__(self, path: Path) -> None:
        self._fh = path.open("a")
        self._started = time.perf_counter()

    def emit(self, rec: dict) -> None:
        self._fh.write(json.dumps({"t": round(time.perf_counter() - self._started, 3), **rec}) + "\n")
        self._fh.flush()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


@dataclass
class PeerRun:
    """One peer's part in a run once it has joined: what a run body (:func:`train`) works with."""

    gossip: Gossip
    cfg: Config
    rank: int  # this peer's data shard
    first: int  # the first round it takes part in (> 0 when it joined late)
    out: Path
    log: RunLog


RunBody = Callable[[PeerRun], Awaitable[dict]]  # what a joined peer does (train; a bench's loop)


async def run_peer(args: argparse.Namespace, body: RunBody | None = None) -> dict:
    """Join run ``args.run`` with an embedded node, wait for ``args.peers`` members, run ``body``
    (default :func:`train`), then serve until the others finish. Returns the body's summary."""
    from lattice.apps.gossip_sgd.options import config_from
    from lattice.cli import node_config, write_atomic
    from lattice.plugins import build_node

    torch.set_num_threads(args.threads)
    cfg = config_from(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = node_config(args, listen=[LOOPBACK], data_dir=out / "node", control=False)
    with RunLog(out / "log.jsonl") as log:
        async with build_node(config) as node:
            if args.addr_file:
                write_atomic(args.addr_file, node.addrs[0] + "\n", what="address file")
            gossip = open_gossip(node, args.run, cfg, args.timeout)
            first, members = await join_run(gossip, cfg.peers, args.wait, late=args.late)
            run = PeerRun(gossip, cfg, members.index(gossip.me) % cfg.peers, first, out, log)
            log.emit({"event": "start", "peer": gossip.me, "rank": run.rank, "members": len(members)})
            summary = await (body or train)(run)
            log.emit(summary)
            await linger(gossip, cfg.rounds, args.linger)
    return summary


def open_gossip(node: Node, run: str, cfg: Config, timeout: float) -> Gossip:
    return Gossip(node, run, cfg.topology, cfg.degree, cfg.seed, timeout=timeout)


async def join_run(gossip: Gossip, peers: int, wait: float, late: bool = False) -> tuple[int, list[str]]:
    """Become a member (``late``: from a few rounds ahead of the run's progress), announce ourselves,
    wait up to ``wait`` s for ``peers`` members (ranks come from the sorted membership).
    Returns (first round, sorted members)."""
    first = await _late_start(gossip, wait) if late else 0
    gossip.join(first)
    await gossip.announce()
    with trio.move_on_after(wait):
        while len(gossip.members()) < peers:
            await gossip.discover()
            await trio.sleep(0.2 + random.random() * 0.3)
    members = sorted(gossip.members())
    await gossip.discover()
    return first, members


async def _late_start(gossip: Gossip, wait: float) -> int:
    """The first round of a peer joining a run in progress: 2 rounds ahead + the lag of progress."""
    with trio.move_on_after(wait):
        while gossip.furthest_round() < 0:
            await gossip.discover()
            await trio.sleep(0.5)
    return gossip.furthest_round() + 1 + PROGRESS_EVERY


async def train(run: PeerRun) -> dict:
    """Train this peer's shard from round ``run.first`` on; write ``model.npy``; the summary."""
    cfg, gossip = run.cfg, run.gossip
    prep = await trio.to_thread.run_sync(lambda: prepare(cfg, [run.rank]))
    algo = build(cfg, prep)
    gossip.round = run.first
    for t in range(run.first, cfg.rounds):
        await run_round(gossip, algo, t)
        gossip.progress(t, final=t == cfg.rounds - 1)
        if cfg.eval_every and ((t + 1) % cfg.eval_every == 0 or t == cfg.rounds - 1):
            run.log.emit(await _evaluation(gossip, algo, prep, t))
    np.save(run.out / "model.npy", algo.models()[0].numpy())
    return _summary(gossip, run.rank)


async def run_round(gossip: Gossip, algo: Algorithm, t: int) -> None:
    """Round ``t``: compute (in a thread) up to each Send, exchange it over the network, resume."""
    gen = algo.round(t)
    send = await trio.to_thread.run_sync(_advance, gen, None)
    while send is not None:
        received = await gossip.exchange(t, send)
        send = await trio.to_thread.run_sync(_advance, gen, received)


async def _evaluation(gossip: Gossip, algo: Algorithm, prep: Prepared, t: int) -> dict:
    """The "round" record after round ``t``; its curve also goes to the node's dashboard panel."""
    metrics = await trio.to_thread.run_sync(lambda: evaluate(algo, prep, 2000))
    panel = gossip.node.dashboard.panel("gossip-sgd", title=f"gossip SGD run {gossip.run}", unit="accuracy")
    panel.push("local accuracy", t + 1, metrics["acc_local"])
    stats = gossip.stats
    return {
        "event": "round",
        "round": t + 1,
        "loss": algo.last_loss,
        **metrics,
        "bytes_sent": stats.bytes_sent,
        "live": len(gossip.live(t)),
        "timeouts": stats.timeouts,
    }


def _summary(gossip: Gossip, rank: int) -> dict:
    ex = gossip.stats.exchange_s
    return {
        "event": "done",
        "peer": gossip.me,
        "rank": rank,
        "bytes_sent": gossip.stats.bytes_sent,
        "messages_sent": gossip.stats.messages_sent,
        "timeouts": gossip.stats.timeouts,
        "duplicates": gossip.stats.duplicates,
        "refused": gossip.stats.refused,
        "exchange_median_s": float(np.median(ex)) if ex else None,
        "dead": sorted(gossip.dead()),
    }


async def linger(gossip: Gossip, rounds: int, limit: float) -> None:
    """Keep serving until every live peer finished (neighbours a phase behind still need us)."""
    with trio.move_on_after(limit):
        while True:
            prog = {str(k): int(v) for k, v in gossip.doc.get_map("progress").items()}
            if all(prog.get(p, -1) >= rounds - 1 for p in gossip.live(rounds)):
                return
            await trio.sleep(0.2)
