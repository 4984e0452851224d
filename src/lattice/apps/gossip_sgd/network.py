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
  missing weight stays on itself). A neighbour whose call fails is marked dead in the CRDT at the
  round it was seen gone; it leaves every peer's graph ``GRACE`` rounds later, the same round for
  all, so gradient trackers are restarted in step (``Algorithm.membership_changed``);
* references (CDProxSGT): a receiver keeps a copy of each neighbour's reference and adds the
  differences it receives; a copy is dropped when a message is missed, and a receiver without one
  asks for the full reference in its next message (``want_full``), which the sender sends once;
* configuration: each member writes its run settings in ``configs``; peers mix only with members
  of the same settings, and a peer whose settings differ from the majority's refuses to start.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import sys
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
from lattice.apps.gossip_sgd.algorithms import Send
from lattice.apps.gossip_sgd.compress import wire_bytes
from lattice.apps.gossip_sgd.experiment import Config
from lattice.codec import buffers, compression
from lattice.errors import ConfigError, LatticeError, NodeError
from lattice.identity import PeerId

if TYPE_CHECKING:
    from lattice.blocking import BlockingNode
    from lattice.node import Node

METHOD = "gossip_sgd.exchange"
SNAPSHOT = "gossip_sgd.snapshot"  # a member asks for our current model (a late joiner starts from it)
GRACE = 2  # a peer seen dead at round r leaves the graph at round r + GRACE (the same round everywhere)
MAX_REF_NAMES = 8
MAX_PAYLOAD = 256 << 20  # one phase's tensors (models up to ~64M float32 parameters, uncompressed)
MAX_PHASE = 64
WINDOW = 3  # rounds ahead of ours we buffer; anything further (or older) is refused
# Progress is written at most every PROGRESS_EVERY rounds unless a second has passed (and always at
# the last round): each write is a CRDT update every peer applies and stores, 11 % of a fast round.
PROGRESS_EVERY = 4
PROGRESS_INTERVAL = 1.0
# A time budget stops the run STOP_LEAD rounds after the furthest round known when a peer first finds
# the budget spent: neighbours wait for each other, so on a ring of 4 no peer is more than 2 rounds
# ahead of another, and the word (a CRDT update, pushed at once) must reach everyone before they get
# there. Progress may lag PROGRESS_EVERY - 1 rounds, which the lead covers too.
STOP_LEAD = WINDOW + PROGRESS_EVERY


@dataclass
class NetReceived:
    """The neighbours' decoded rows for one phase, and the mixing weights of those that answered."""

    own: dict[str, Tensor]  # [1, ...]
    decoded_own: dict[str, Tensor]
    weights: dict[str, float]  # peer id -> w_ij of neighbours that answered
    self_weight: float
    rows: dict[str, dict[str, Tensor]]  # peer id -> name -> tensor [...]
    self_exact: bool
    refs_own: dict[str, Tensor] = field(default_factory=dict)  # name -> our reference after this phase
    ref_rows: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # name -> peer -> its copy
    # rows of decoded_own decoded only if asked for (most algorithms never ask: decoding a 16 MB
    # model's fp16 took ~6 ms of every round, before anything was sent)
    decode_later: dict[str, Callable[[], Tensor]] = field(default_factory=dict)

    def sent(self, name: str) -> Tensor:
        """Our row ``name`` as the neighbours decode it."""
        if name not in self.decoded_own:
            self.decoded_own[name] = self.decode_later.pop(name)()
        return self.decoded_own[name]

    def mix(self, name: str) -> Tensor:
        own = self.own[name] if self.self_exact else self.decoded_own[name]
        if own.requires_grad:  # out= refuses autograd inputs
            out = own * self.self_weight
        else:
            out = torch.mul(own, self.self_weight, out=_empty_like(own))
        for peer, w in self.weights.items():
            out.add_(self.rows[peer][name].unsqueeze(0), alpha=w)
        return out

    def neighbours(self, name: str) -> list[list[Tensor]]:
        return [[self.rows[p][name] for p in sorted(self.weights)]]

    def mix_ref(self, name: str) -> Tensor:
        copies = self.ref_rows.get(name, {})
        used = {p: w for p, w in self.weights.items() if p in copies}
        out = self.refs_own[name] * (1.0 - sum(used.values()))
        for peer, w in used.items():
            out.add_(copies[peer].unsqueeze(0), alpha=w)
        return out


@dataclass
class Stats:
    bytes_sent: int = 0
    messages_sent: int = 0
    timeouts: int = 0
    duplicates: int = 0
    refused: int = 0
    full_refs_sent: int = 0  # full references sent to a neighbour that had no exact copy
    exchange_s: list[float] = field(default_factory=list)


class Gossip:
    """Delivers :class:`Send` phases between peer processes; one instance per peer and run.

    ``settings``: this peer's run settings (plain JSON data); peers mix only with members whose
    settings are the same, and :meth:`check_settings` refuses to start against a majority of others.
    """

    def __init__(
        self,
        node: Node,
        run: str,
        kind: str = "ring",
        degree: int = 4,
        seed: int = 0,
        timeout: float = 10.0,
        max_payload: int = MAX_PAYLOAD,
        settings: dict | None = None,
    ) -> None:
        self.node, self.run, self.kind, self.degree, self.seed = node, run, kind, degree, seed
        self.timeout = timeout
        self.me = str(node.peer_id)
        # membership and progress are rebuilt by anti-entropy after a crash: no fsync per update (a
        # blocking fsync per neighbour's progress write stalled the event loop, 5 % of a round)
        self.doc = node.crdt.open(f"gossip_sgd/{run}", fsync="batch")
        self.settings = json.dumps(settings or {}, sort_keys=True)
        self.round = 0
        self.stats = Stats()
        self._inbox: dict[tuple[int, str, str], dict[str, Any]] = {}
        self._seen: set[tuple[int, str, str]] = set()
        self._arrived = trio.Condition()
        self._dead: dict[str, int] = {}  # peer -> round we saw a call to it fail
        self._copies: dict[tuple[str, str], Tensor] = {}  # (peer, name) -> its reference, as we know it
        self._full_wanted: set[tuple[str, str]] = set()  # (peer, name): send it our full reference
        self._progress_at = (-PROGRESS_EVERY, -math.inf)  # (round, monotonic time) last written
        # () -> (round, model row as float32 numpy): what a late joiner gets (set by GossipRun)
        self.snapshot_source: Callable[[], tuple[int, np.ndarray]] | None = None
        self._snapshot: tuple[int, str] | None = None  # (round, content id) of the last one shared
        self._snapshot_lock = trio.Lock()
        node.rpc.register(METHOD, self._handle, max_payload=max_payload)
        node.rpc.register(SNAPSHOT, self._handle_snapshot)

    # -- membership (CRDT) and discovery (DHT)
    def join(self, first_round: int = 0) -> None:
        configs = self.doc.get_map("configs")
        if configs.get(self.me) != self.settings:
            configs[self.me] = self.settings
        members = self.doc.get_map("members")
        if members.get(self.me) != first_round:  # a peer coming back joins again from a later round
            members[self.me] = first_round

    def all_members(self) -> dict[str, int]:
        """Every member (peer -> first round), whatever its settings."""
        return {str(k): int(v) for k, v in self.doc.get_map("members").items()}

    def members(self) -> dict[str, int]:
        """Members with our settings (peer -> first round): the only ones we mix with."""
        configs = self.doc.get_map("configs")
        return {p: r for p, r in self.all_members().items() if configs.get(p) == self.settings}

    def run_settings(self) -> tuple[str, int]:
        """(settings held by most members, how many hold them); a tie goes to the smallest JSON."""
        configs = self.doc.get_map("configs")
        counts: dict[str, int] = {}
        for p in self.all_members():
            value = configs.get(p)
            if isinstance(value, str):
                counts[value] = counts.get(value, 0) + 1
        if not counts:
            return self.settings, 0
        best = min(counts, key=lambda v: (-counts[v], v))
        return best, counts[best]

    def settings_known(self) -> bool:
        """Whether every member's settings have reached us (the CRDT syncs them with the members)."""
        configs = self.doc.get_map("configs")
        return all(p in configs for p in self.all_members())

    def start_clock(self) -> float:
        """Note when this peer starts training (once: a peer coming back keeps its first time);
        returns the run's clock (:meth:`run_start`)."""
        started = self.doc.get_map("started")  # peer -> wall-clock time it started training
        if self.me not in started:
            started[self.me] = time.time()
        return self.run_start()

    def run_start(self) -> float:
        """The run's clock: the wall-clock time its first member started training (the earliest
        start known here: others' arrive within a round)."""
        times = [float(v) for v in self.doc.get_map("started").values()]
        return min(times, default=time.time())

    def propose_stop(self, round_: int) -> int:
        """Say, once, that the run's time budget is spent: the run stops after round ``round_ +
        STOP_LEAD`` at the latest (the furthest progress known counts too); returns the stop round."""
        stops = self.doc.get_map("stop")
        if self.me not in stops:
            stops[self.me] = max(round_, self.furthest_round()) + STOP_LEAD
        return self.stop_round()  # type: ignore[return-value]

    def stop_round(self) -> int | None:
        """The last round of a run with a time budget: the earliest any member proposed (None: not
        yet). Every peer stops after it, so none waits for a neighbour that already stopped."""
        return min((int(v) for v in self.doc.get_map("stop").values()), default=None)

    def check_settings(self) -> None:
        """Raise ConfigError (one line, naming the differing settings) if the run's are not ours."""
        theirs, holders = self.run_settings()
        if theirs == self.settings:
            return
        raise ConfigError(
            f"run {self.run!r}: {holders} of {len(self.all_members())} members use other settings "
            f"({settings_diff(json.loads(self.settings), json.loads(theirs))}); start this peer with "
            "the same --algorithm, --peers, --topology, --set ... as the others, or use another --run"
        )

    def _deaths(self) -> dict[str, int]:
        """peer -> round it was seen gone, for deaths since its latest joining (a peer that comes back
        joins again from a later round, which revives it)."""
        members = self.all_members()
        seen = {str(k): int(v) for k, v in self.doc.get_map("dead").items()}
        for peer, at in self._dead.items():
            seen[peer] = max(seen.get(peer, at), at)
        return {p: at for p, at in seen.items() if p in members and at >= members[p]}

    def dead(self) -> set[str]:
        return set(self._deaths())

    def live(self, round_: int) -> list[str]:
        """Sorted members taking part in ``round_``: joined by then, and not seen dead ``GRACE`` or
        more rounds before (a dead peer leaves every graph at the same round)."""
        gone = self._deaths()
        return sorted(
            p
            for p, start in self.members().items()
            if start <= round_ and (p not in gone or round_ < gone[p] + GRACE)
        )

    def mark_dead(self, peer: str) -> None:
        if peer == self.me or peer in self.dead():
            return
        self._dead[peer] = self.round
        dead = self.doc.get_map("dead")
        if int(dead.get(peer, -1)) < self.all_members().get(peer, 0):
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

    async def sync(self, timeout: float = 5.0) -> int:
        """Sync the run's document with the connected peers now; returns with how many it worked."""
        done = 0
        for row in await self.node.peers():
            with trio.move_on_after(timeout):
                try:
                    await self.node.crdt.sync(PeerId.from_string(row["peer_id"]), self.doc)
                    done += 1
                except LatticeError:
                    pass
        return done

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
        full, want = payload.get("full", {}), payload.get("want_full", [])
        if (
            not isinstance(rnd, int)
            or not isinstance(phase, str)
            or len(phase) > MAX_PHASE
            or not _named_arrays(tensors_)
            or not _named_arrays(full)
            or not isinstance(want, list)
            or len(want) > MAX_REF_NAMES
            or not all(isinstance(n, str) and len(n) <= MAX_PHASE for n in want)
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
        self._full_wanted.update((sender, n) for n in want)
        self._inbox[key] = {"tensors": tensors_, "full": full}
        async with self._arrived:
            self._arrived.notify_all()
        return "ok"

    async def _handle_snapshot(self, payload: Any, ctx: Any) -> dict:
        """A member's request for our current model: put it in the content store (once per round,
        whoever asks) and answer its id."""
        if (
            not isinstance(payload, dict)
            or payload.get("run") != self.run
            or str(ctx.peer) not in self.members()
            or self.snapshot_source is None
        ):
            self.stats.refused += 1
            return {"error": "refused"}
        async with self._snapshot_lock:
            round_, x = self.snapshot_source()
            if self._snapshot is None or self._snapshot[0] != round_:
                old, self._snapshot = self._snapshot, (round_, str(await self.node.content.add({"x": x})))
                if old is not None:
                    await self.node.content.unpin(old[1])
        return {"cid": self._snapshot[1], "round": self._snapshot[0]}

    # -- one phase
    async def exchange(self, round_: int, send: Send) -> NetReceived:
        started = time.perf_counter()
        if round_ != self.round:
            self.round = round_
            self._inbox = {k: v for k, v in self._inbox.items() if k[0] >= round_}
            self._seen = {k for k in self._seen if k[0] >= round_ - 1}
        neighbours, _self_weight = self.neighbours(round_)
        gone = self.dead()  # seen dead, still in the graph until GRACE rounds pass: not waited for
        weights = {p: w for p, w in neighbours.items() if p not in gone}
        payload_t: dict[str, Any] = {}
        own, decoded_own = {}, {}
        decode_later: dict[str, Callable[[], Tensor]] = {}
        for name, t in send.tensors.items():
            row = t.detach().reshape(-1).float().cpu().contiguous()
            codec = send.codecs.get(name)
            arr = row.numpy()
            if codec is None:
                payload_t[name] = arr
                decoded_own[name] = t
            else:
                c = compression.compress(codec, arr)
                payload_t[name] = c
                decode = functools.partial(_decoded, codec, c, t)
                if name in send.refs or not send.self_exact:  # needed now: to send, or to mix
                    decoded_own[name] = decode()
                else:  # off the critical path: only if the algorithm asks (NetReceived.sent)
                    decode_later[name] = decode
            own[name] = t
        refs_own = {name: ref + decoded_own[name] for name, ref in send.refs.items()}
        base = {"run": self.run, "round": round_, "phase": send.phase, "tensors": payload_t}
        size = sum(wire_bytes(send.codecs.get(n), t.numel() // t.shape[0]) for n, t in send.tensors.items())
        answered: dict[str, dict[str, Tensor]] = {}
        fulls: dict[str, dict[str, Tensor]] = {}
        deadline = trio.current_time() + self.timeout

        async def push(peer: str) -> None:
            full = {n: refs_own[n].reshape(-1).float().cpu().contiguous().numpy() for n in refs_own
                    if (peer, n) in self._full_wanted}  # fmt: skip
            want = [n for n in refs_own if (peer, n) not in self._copies]
            payload = {**base, "full": full, "want_full": want} if refs_own else base
            try:
                with trio.fail_after(self.timeout):
                    await self.node.rpc.call(peer, METHOD, payload, timeout=self.timeout)
                self.stats.bytes_sent += size + sum(wire_bytes(None, a.size) for a in full.values())
                self.stats.messages_sent += 1
                self.stats.full_refs_sent += len(full)
                self._full_wanted.difference_update((peer, n) for n in full)
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
                                rows = _validate(got["tensors"], send.tensors)
                                full = _validate(got["full"], send.refs, partial=True)
                                if rows is not None and full is not None:
                                    answered[peer] = rows
                                    fulls[peer] = full
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
        ref_rows = {name: self._update_copies(name, answered, fulls) for name in send.refs}
        self.stats.exchange_s.append(time.perf_counter() - started)
        return NetReceived(
            own,
            decoded_own,
            used,
            1.0 - sum(used.values()),
            answered,
            send.self_exact,
            refs_own,
            ref_rows,
            decode_later,
        )

    def _update_copies(
        self, name: str, answered: dict[str, dict[str, Tensor]], fulls: dict[str, dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Our copies of the neighbours' reference ``name`` after this phase (peer -> copy): a full
        reference replaces a copy, a difference is added to it; a peer whose message we did not get,
        or who sent a difference we have no copy for, has none (its next message brings a full one)."""
        out = {}
        for peer, rows in answered.items():
            key = (peer, name)
            if name in fulls[peer]:
                self._copies[key] = fulls[peer][name].clone()
            elif key in self._copies:
                self._copies[key] += rows[name]
            else:
                continue
            out[peer] = self._copies[key]
        for key in [k for k in self._copies if k[1] == name and k[0] not in out]:
            del self._copies[key]
        return out


def _empty_like(t: Tensor) -> Tensor:
    """A new tensor like ``t`` for a round's result; a large float32 one on the CPU in a recycled
    buffer (``buffers.recycled``): a fresh one's page faults cost more than the arithmetic."""
    if t.device.type != "cpu" or t.dtype != torch.float32:
        return torch.empty_like(t)
    return torch.from_numpy(buffers.recycled(4 * t.numel()).view(np.float32)).view(t.shape)


def _named_arrays(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items()
    )


def settings_diff(ours: dict, theirs: dict, limit: int = 4) -> str:
    """'key: ours here, theirs in the run' for the first ``limit`` differing (nested) settings."""
    flat_ours, flat_theirs = _flatten(ours), _flatten(theirs)
    keys = sorted(k for k in flat_ours.keys() | flat_theirs.keys() if flat_ours.get(k) != flat_theirs.get(k))
    parts = [f"{k}: {flat_ours.get(k)!r} here, {flat_theirs.get(k)!r} in the run" for k in keys[:limit]]
    return "; ".join(parts) + (f"; {len(keys) - limit} more" if len(keys) > limit else "")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _validate(
    got: dict[str, np.ndarray], expected: dict[str, Tensor], partial: bool = False
) -> dict[str, Tensor] | None:
    """The received tensors if they match ours in names (a subset if ``partial``), sizes and dtype."""
    names_ok = set(got) <= set(expected) if partial else set(got) == set(expected)
    if not names_ok:
        return None
    out = {}
    for name, arr in got.items():
        per_row = expected[name].shape[1:]
        if arr.dtype != np.float32 or arr.size != math.prod(per_row):
            return None
        if not math.isfinite(float(arr.sum())):  # a NaN/inf anywhere poisons the sum (cheap check)
            return None
        if not arr.flags.writeable:
            arr = arr.copy()
        out[name] = torch.from_numpy(arr).view(per_row).to(expected[name].device)
    return out


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
    """One peer's part in a run once it has joined: what a run body (a bench's loop) works with."""

    gossip: Gossip
    cfg: Config
    rank: int  # this peer's data shard
    first: int  # the first round it takes part in (> 0 when it joined late)
    out: Path
    log: RunLog


RunBody = Callable[[PeerRun], Awaitable[dict]]  # what a joined peer does (e.g. bench/gossip_sgd_net.py)


async def run_peer(args: argparse.Namespace, body: RunBody) -> dict:
    """Join run ``args.run`` with an embedded node, wait for ``args.peers`` members, run ``body``,
    then serve until the others finish. Returns the body's summary. (Training itself goes through
    :class:`lattice.apps.gossip_sgd.optimizer.GossipRun`; this is for other bodies, e.g. benches.)"""
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
            announce_address(node)
            gossip = open_gossip(
                node, args.run, run_settings(cfg), cfg.topology, cfg.degree, cfg.seed, args.timeout
            )
            first, members = await join_run(gossip, cfg.peers, args.wait, late=args.late)
            run = PeerRun(gossip, cfg, members.index(gossip.me) % cfg.peers, first, out, log)
            log.emit({"event": "start", "peer": gossip.me, "rank": run.rank, "members": len(members)})
            summary = await body(run)
            log.emit(summary)
            await linger(gossip, cfg.rounds, args.linger)
    return summary


def announce_address(node: Node | BlockingNode) -> None:
    """Print the peer id and the addresses the next peers can ``--bootstrap`` to (stderr)."""
    print(f"gossip-sgd peer {node.peer_id}", file=sys.stderr, flush=True)
    for addr in node.addrs:
        print(f"listening: {addr}", file=sys.stderr, flush=True)


def run_settings(cfg: Config) -> dict:
    """What every peer of a run must agree on: the config but the data directory, the device and
    evaluation."""
    skip = ("data_dir", "eval_every", "test_limit", "device")
    return {k: v for k, v in cfg.as_dict().items() if k not in skip}


def open_gossip(
    node: Node,
    run: str,
    settings: dict,
    kind: str = "ring",
    degree: int = 4,
    seed: int = 0,
    timeout: float = 10.0,
) -> Gossip:
    return Gossip(node, run, kind, degree, seed, timeout=timeout, settings=settings)


async def join_run(gossip: Gossip, peers: int, wait: float, late: bool = False) -> tuple[int, list[str]]:
    """Become a member (``late``: from a few rounds ahead of the run's progress), announce ourselves,
    wait up to ``wait`` s for ``peers`` members (ranks come from the sorted membership), and refuse
    (ConfigError) if most members use other settings. Returns (first round, sorted members)."""
    first = await _late_start(gossip, wait) if late else 0
    gossip.join(first)
    await gossip.announce()
    with trio.move_on_after(wait):
        while len(gossip.all_members()) < peers or not gossip.settings_known():
            await gossip.discover()
            await trio.sleep(0.2 + random.random() * 0.3)
    gossip.check_settings()
    members = sorted(gossip.members())
    await gossip.discover()
    return first, members


async def _late_start(gossip: Gossip, wait: float) -> int:
    """The first round of a peer joining a run in progress: 2 rounds ahead + the lag of progress.
    The run's document is synced with a connected peer first: a peer coming back after a crash has
    the progress of the time it died on disk."""
    with trio.move_on_after(wait):
        while True:
            await gossip.discover()
            if await gossip.sync() and gossip.furthest_round() >= 0:
                return gossip.furthest_round() + 1 + PROGRESS_EVERY
            await trio.sleep(0.5)
    raise NodeError(f"run {gossip.run!r}: no member in progress answered within {wait:.0f} s (joining late)")


async def pull_snapshot(
    gossip: Gossip, first: int, timeout: float = 30.0
) -> tuple[str, int, np.ndarray] | None:
    """A live neighbour's current model for a peer joining at round ``first``: (peer, round, x), asked
    with ``gossip_sgd.snapshot`` and fetched through the content store; None if nobody could."""
    neighbours = [p for p in gossip.live(first) if p != gossip.me] or [
        p for p in gossip.live(first - 1) if p != gossip.me
    ]
    for peer in neighbours:
        with trio.move_on_after(timeout):
            try:
                reply = await gossip.node.rpc.call(peer, SNAPSHOT, {"run": gossip.run}, timeout=timeout)
                if not isinstance(reply, dict) or not isinstance(reply.get("cid"), str):
                    continue
                got = await gossip.node.content.get_tensors(reply["cid"], ["x"], providers=[peer])
            except LatticeError:
                continue
            x = np.asarray(got["x"], dtype=np.float32)
            if x.ndim == 1 and np.isfinite(x).all():
                return peer, int(reply.get("round", -1)), x.copy()
    return None


async def publish_final(gossip: Gossip, model: np.ndarray) -> str:
    """Put our final model in the content store and its id in the run's document (``finals``)."""
    cid = str(await gossip.node.content.add({"x": model}))
    gossip.doc.get_map("finals")[gossip.me] = cid
    return cid


FETCH_TIMEOUT = 30.0  # one peer's final model from the content store


async def collect_finals(gossip: Gossip, live: list[str], wait: float) -> list[np.ndarray]:
    """Every live peer's final model (waits up to ``wait`` s for them to be published)."""
    finals = gossip.doc.get_map("finals")
    with trio.move_on_after(wait):
        while not all(p in finals for p in live):
            await trio.sleep(0.2)
    rows = []
    for peer in live:
        cid = finals.get(peer)
        if not isinstance(cid, str):
            continue
        with trio.move_on_after(FETCH_TIMEOUT):
            try:
                got = await gossip.node.content.get_tensors(cid, ["x"], providers=[peer])
            except LatticeError:
                continue
            row = np.asarray(got["x"], dtype=np.float32)
            if row.ndim == 1 and np.isfinite(row).all():
                rows.append(row.copy())
    return rows


async def share_average(gossip: Gossip, live: list[str], rec: dict | None, wait: float) -> dict | None:
    """Publish (the evaluator, ``rec``) or wait for (the others) the run's "average" record; the
    evaluator stays until every live peer has it (the CRDT pushes it while we run)."""
    result = gossip.doc.get_map("average")  # "record": the evaluator's JSON; peer -> True: seen
    if rec is not None:
        result["record"] = json.dumps(rec)
    with trio.move_on_after(wait):
        while not isinstance(result.get("record"), str):
            await trio.sleep(0.2)
    if not isinstance(result.get("record"), str):
        return None
    out = json.loads(result["record"])
    result[gossip.me] = True
    if rec is not None:
        with trio.move_on_after(wait):
            while not all(result.get(p) is True for p in live):
                await trio.sleep(0.1)
    return out


def summary(gossip: Gossip, rank: int) -> dict:
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
        "full_refs_sent": gossip.stats.full_refs_sent,
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


def _decoded(codec: str, c: Any, like: Tensor) -> Tensor:
    """What a neighbour decodes from ``c`` (``like``'s shape and device)."""
    dec, _ = compression.decompress(codec, c.data, c.meta, like.numel())
    return torch.from_numpy(dec).view(like.shape).to(like.device)
