"""A stage server: a node service that runs blocks [start, end) for clients' sessions.

RPC methods (payloads are msgpack values with tensors, never pickle):

- ``mesh.forward`` {session, start, end, pos, inputs: [tensor, ...], want: "all"|"last",
  logits: "all"|"last"} -> {outputs: [tensor, ...]}. ``pos == 0`` opens (or restarts) the session;
  otherwise ``pos`` must equal the session's cache length. Several inputs are run in order, as if
  sent one call each: that is how a client replays its history to rebuild a cache bitwise.
- ``mesh.close`` {session} -> bool; ``mesh.info`` -> what the server holds and its limits.

Strangers share the server within :class:`ServerLimits`, all checked before any compute: sessions
per peer and in all, context length, KV-cache bytes, reply bytes; a prompt is computed in chunks
(bounded attention workspace). Steps are batched across sessions (continuous batching): one
compute task takes the waiting steps in arrival order, as many as ``max_batch`` sessions and one
chunk's rows allow, and runs them as one forward (the linear layers over all rows at once); a long
prompt delays another session's step by at most one chunk, and a session's results are bitwise
the same in a batch or alone (``model.forward_batch``).

``mesh.info`` also carries the model's card (``card.py``): config, the content id of the
tokenizer (added to the node's content store), stop tokens, chat format, so clients need no copy.

The server announces itself under ``mesh/<model id>`` in the DHT (its own subkey, refreshed every
``announce_interval``, expiring after three missed refreshes).
"""

from __future__ import annotations

import ctypes
import logging
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import trio

from lattice.apps.mesh_inference.card import ModelCard
from lattice.apps.mesh_inference.config import MIN_CHUNK, LlamaConfig
from lattice.apps.mesh_inference.errors import CacheFull, MeshError, RequestTooLarge, ServerBusy, SessionError
from lattice.apps.mesh_inference.machine import MachineServers
from lattice.apps.mesh_inference.model import KVCache, Stage, chunk_bounds
from lattice.apps.mesh_inference.routing import ServerInfo, announcement_key
from lattice.apps.mesh_inference.tokenizer import chat_format, stop_tokens
from lattice.errors import ConfigError, LatticeError, NodeError, PayloadError

if TYPE_CHECKING:
    from lattice.node import Node

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)  # a session key

MAX_SESSION_ID = 64
BALANCE_INTERVAL = 2.0  # s between re-counts of this machine's servers (threads="auto")


@dataclass
class ServerLimits:
    """What a stage server gives strangers (docs/operators.md, "Mesh inference stage servers")."""

    max_sessions: int = 16  # sessions over all peers
    max_sessions_per_peer: int = 4  # so one peer cannot hold them all
    cache_bytes: int = 512 << 20  # KV-cache budget over all sessions
    max_context: int = 2048  # positions per session (never more than the model has)
    prefill_chunk: int = 256  # positions per compute step (>= MIN_CHUNK); shrunk to fit step_bytes
    step_bytes: int = 128 << 20  # transient memory of one step (attention scores, activations, logits)
    max_reply_bytes: int = 64 << 20  # outputs of one call (logits="all" is vocab floats per position)
    session_ttl: float = 60.0  # an idle session is dropped after this ...
    pressure_ttl: float = 2.0  # ... or after this, when a newcomer or a growing cache needs the room
    max_inputs: int = 8192  # inputs in one call (a replay sends one per step so far)
    max_tokens_per_call: int = 8192
    # steps of at most this many rows (decode steps) run on the event loop: a thread hop costs a
    # wake-up, which on a busy machine was a large part of the mesh's per-token overhead
    inline_tokens: int = 4
    max_batch: int = 16  # sessions whose steps run as one forward (1: no batching)

    def __post_init__(self) -> None:
        if min(self.max_sessions, self.max_sessions_per_peer, self.max_context, self.max_batch) < 1:
            raise ConfigError("max_sessions, max_sessions_per_peer, max_context and max_batch must be >= 1")
        if self.prefill_chunk < MIN_CHUNK:
            raise ConfigError(f"prefill_chunk must be >= {MIN_CHUNK}")
        if self.pressure_ttl <= 0 or self.session_ttl <= 0:
            raise ConfigError("session_ttl and pressure_ttl must be > 0")
        self.pressure_ttl = min(self.pressure_ttl, self.session_ttl)


def fit_chunk(config: LlamaConfig, limits: ServerLimits, logits: bool) -> int:
    """The largest chunk <= prefill_chunk whose step at the longest context fits step_bytes
    (the estimate is affine in the chunk's rows); ConfigError if not even MIN_CHUNK fits."""
    context = min(limits.max_context, config.max_positions)
    fixed = config.step_bytes(0, context, logits)
    per_row = config.step_bytes(1, context, logits) - fixed
    chunk = min(limits.prefill_chunk, (limits.step_bytes - fixed) // per_row)
    if chunk < MIN_CHUNK:
        raise ConfigError(f"step_bytes {limits.step_bytes} is too small for a {context}-position context")
    return chunk


def reply_bytes(config: LlamaConfig, sizes: list[int], end: int, want: str, logits: str) -> int:
    """Bytes of mesh.forward's outputs for inputs of ``sizes`` positions (fp32)."""
    last = end == config.n_layers
    kept = sizes if want == "all" else sizes[-1:]
    rows = len(kept) if last and logits == "last" else sum(kept)
    return rows * (config.vocab_size if last else config.hidden) * 4


def pick_victim(
    sessions: Iterable[tuple[K, str, float, bool]], requester: str, now: float, idle: float
) -> K | None:
    """The session a full server gives up for ``requester``'s new one, from (key, peer,
    last_used, busy) rows: the longest idle (at least ``idle`` s), else the least recently used of
    the peer holding the most sessions if it holds at least two more than the requester (so peer
    ids share the server evenly however many there are), else None. Busy ones are never taken."""
    rows = list(sessions)
    free = [r for r in rows if not r[3]]
    idle_rows = [r for r in free if now - r[2] >= idle]
    if idle_rows:
        return min(idle_rows, key=lambda r: r[2])[0]
    counts = Counter(r[1] for r in rows)
    top = max((n for p, n in counts.items() if p != requester), default=0)
    if top < counts[requester] + 2:
        return None
    over = [r for r in free if r[1] != requester and counts[r[1]] == top]
    return min(over, key=lambda r: r[2])[0] if over else None


def plan_batch(steps: Sequence[tuple[Hashable, int]], max_batch: int, max_rows: int) -> list[int]:
    """Which waiting steps, given as (blocks, rows) in arrival order, run together: the oldest, then
    later ones for the same blocks while at most ``max_batch`` steps and ``max_rows`` rows."""
    if not steps:
        return []
    key, rows = steps[0]
    chosen = [0]
    for i in range(1, len(steps)):
        if len(chosen) >= max_batch:
            break
        k, r = steps[i]
        if k == key and rows + r <= max_rows:
            chosen.append(i)
            rows += r
    return chosen


@dataclass
class _Step:
    """One session's step waiting for (or in) a batch; the compute task fills in the result."""

    session: _Session
    x: torch.Tensor
    blocks: tuple[int, int]
    head: bool
    done: trio.Event = field(default_factory=trio.Event)
    output: torch.Tensor | None = None
    error: BaseException | None = None


@dataclass
class _Session:
    start: int
    end: int
    cache: KVCache = field(default_factory=KVCache)
    last_used: float = field(default_factory=time.monotonic)
    lock: trio.Lock = field(default_factory=trio.Lock)


def release_large_buffers(threshold: int = 1 << 20) -> bool:
    """Have glibc mmap every allocation >= ``threshold`` and unmap it when freed. By default it
    raises that threshold after each free (up to 32 MiB), so a chunked prompt's attention buffers,
    a little bigger each chunk, pile up in the heap: the peak RSS was 1.8x the live bytes that
    ``step_bytes`` bounds. Process-wide: `serve-model` calls it; False where there is no mallopt."""
    try:
        return bool(ctypes.CDLL(None).mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def free_memory() -> int:
    """Bytes of memory the machine has available (MemAvailable), 0 if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class StageServer:
    """Serves a :class:`Stage` of model ``model_id`` (add to a node with ``node.add_service``)."""

    name = "mesh"

    def __init__(
        self,
        stage: Stage | Callable[[Any], Awaitable[Stage]],
        model_id: str,
        limits: ServerLimits | None = None,
        *,
        announce_interval: float = 10.0,
        throughput: float | None = None,
        threads: int | str | None = None,
        tokenizer: Any = None,
        eos: int | None = None,
    ) -> None:
        """``threads``: torch threads; "auto": this machine's cores shared among its stage servers
        (lattice.apps.mesh_inference.machine), re-balanced as servers start and stop; None: leave
        torch's setting alone (a library user's process may run other work). ``tokenizer`` (a
        ``tokenizers.Tokenizer``) and ``eos``: published in the model card for thin clients."""
        self.stage: Stage = stage if isinstance(stage, Stage) else None  # type: ignore[assignment]
        self._loader = None if isinstance(stage, Stage) else stage
        self.ready = trio.Event()  # set once the stage is loaded, served and announced
        self.model_id = model_id
        self.limits = limits or ServerLimits()
        self.announce_interval = announce_interval
        self.throughput = throughput
        self.threads = threads
        self._machine: MachineServers | None = None
        self._want_threads: int | None = threads if isinstance(threads, int) else None
        self.node: Node | None = None
        self._sessions: dict[tuple[str, str], _Session] = {}
        self._tokenizer, self._eos = tokenizer, eos
        self.card: ModelCard | None = None  # once serving
        # steps waiting for the compute task, in arrival order (it runs them in batches)
        self._waiting: list[_Step] = []
        self._work = trio.Event()
        self._computing = False  # a batch runs (torch's thread count must not change under it)
        self.chunk = 0  # positions per prompt step (fit_chunk, once the stage is loaded)
        self.stats = {"forwards": 0, "tokens": 0, "replays": 0, "refused": 0, "expired": 0, "evicted": 0,
                      "steps": 0, "batched": 0, "max_batch": 0, "compute_s": 0.0,
                      "max_step_s": 0.0}  # fmt: skip

    def set_tokenizer(self, tokenizer: Any, eos: int | None) -> None:
        """What the model card publishes, when only the loader learns it (a packed model's file
        carries its tokenizer): call it before the loader returns."""
        self._tokenizer, self._eos = tokenizer, eos

    # -- lifecycle
    async def run(self, node: Node, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Starts at once (the node can finish starting and join the network); a loader given
        instead of a stage runs first (it may look at the DHT), then the methods are served."""
        self.node = node
        task_status.started()
        if self.threads == "auto":
            self._machine = MachineServers()
            self._machine.register()
        try:
            await self._serve(node)
        finally:
            if self._machine is not None:
                self._machine.unregister()

    async def _serve(self, node: Any) -> None:
        if self._machine is not None:
            self._want_threads = self._machine.threads()
        self._apply_threads()  # before loading: dequantizing runs on torch's threads too
        if self.stage is None:
            assert self._loader is not None
            self.stage = await self._loader(node)
        self.chunk = fit_chunk(self.stage.config, self.limits, self.stage.end == self.stage.config.n_layers)
        if self.throughput is None:
            self.throughput = await trio.to_thread.run_sync(self._measure)
        # the largest valid request (max_tokens_per_call hidden states): larger ones are refused unread
        max_request = self.limits.max_tokens_per_call * max(4 * self.stage.config.hidden, 8) + (1 << 20)
        self.card = await self._make_card(node)
        node.rpc.register("mesh.forward", self._forward, max_payload=max_request)
        node.rpc.register("mesh.close", self._close)
        node.rpc.register("mesh.info", self._info)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._compute_loop)
            nursery.start_soon(self._announce_loop)
            nursery.start_soon(self._expire_loop)
            if self._machine is not None:
                nursery.start_soon(self._balance_loop, self._machine)
            await trio.sleep_forever()

    async def _make_card(self, node: Any) -> ModelCard:
        """The model card; the tokenizer's JSON goes to the node's content store (if it runs one)."""
        cid, size, chat = None, 0, None
        stop: tuple[int, ...] = ()
        if self._tokenizer is not None:
            stop, chat = tuple(stop_tokens(self._tokenizer, self._eos)), chat_format(self._tokenizer)
            data = self._tokenizer.to_str().encode()
            try:
                content = node.content
            except NodeError:
                log.warning("no content service: clients cannot get the tokenizer from this server")
            else:
                cid, size = str(await content.add(data)), len(data)
        return ModelCard(self.model_id, self.stage.config, cid, size, stop, chat, self.stage.dtype_name)

    async def _balance_loop(self, machine: MachineServers) -> None:
        """Re-count this machine's servers; apply the share now if no step runs (else the compute
        task applies it before its next step)."""
        while True:
            await trio.sleep(BALANCE_INTERVAL)
            self._want_threads = machine.threads()
            if not self._computing:
                self._apply_threads()

    def _apply_threads(self) -> None:
        """Set torch's threads to the wanted count (called between compute steps, never during one)."""
        if self._want_threads is not None and torch.get_num_threads() != self._want_threads:
            torch.set_num_threads(self._want_threads)

    def _measure(self) -> float:
        """Tokens/s of one-token steps through this stage's blocks (what the client cares about)."""
        c = self.stage.config
        x = torch.zeros(1, 1, dtype=torch.int64) if self.stage.start == 0 else torch.zeros(1, 1, c.hidden)
        cache = KVCache()
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            self.stage.forward(x, cache)
            times.append(time.perf_counter() - t0)
        return round(1.0 / max(statistics.median(times[1:]), 1e-6), 1)

    @property
    def cache_used(self) -> int:
        return sum(s.cache.nbytes for s in self._sessions.values())

    def session_ids(self) -> list[tuple[str, str]]:
        """(peer id, session id) of every session held."""
        return list(self._sessions)

    @property
    def max_context(self) -> int:
        return min(self.limits.max_context, self.stage.config.max_positions)

    def _running_on(self) -> Node:
        if self.node is None:
            raise LatticeError("the stage server is not running")
        return self.node

    def info(self) -> ServerInfo:
        node = self._running_on()
        return ServerInfo(
            str(node.peer_id), self.stage.start, self.stage.end, self.stage.config.n_layers,
            float(self.throughput or 0.0), free_memory(), max(0, self.limits.cache_bytes - self.cache_used),
            len(self._sessions), self.limits.max_sessions, tuple(node.addrs[:8]),
        )  # fmt: skip

    async def announce(self) -> int:
        """Publish this server's entry now; returns how many peers stored it."""
        return await self._running_on().dht.put(
            announcement_key(self.model_id), self.info().encode(), ttl=3 * self.announce_interval + 1
        )

    async def _announce_loop(self) -> None:
        delay = 0.1
        while True:  # quickly until somebody else holds the entry, then every interval
            try:
                stored = await self.announce()
            except (LatticeError, trio.TooSlowError) as exc:
                log.debug("mesh announcement failed: %s", exc)
                stored = 0
            self.ready.set()
            delay = self.announce_interval if stored > 1 else min(delay * 2, self.announce_interval)
            await trio.sleep(delay)

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(min(5.0, self.limits.session_ttl / 4))
            cutoff = time.monotonic() - self.limits.session_ttl
            for key, session in list(self._sessions.items()):
                if session.last_used < cutoff and not session.lock.locked():
                    del self._sessions[key]
                    self.stats["expired"] += 1

    # -- RPC handlers
    async def _info(self, payload: Any) -> dict:
        info = self.info()
        return {
            "model_id": self.model_id, "start": info.start, "end": info.end, "n_layers": info.n_layers,
            "config": self.stage.config.as_dict(), "throughput": info.throughput, "sessions": info.sessions,
            "max_sessions": self.limits.max_sessions,
            "max_sessions_per_peer": self.limits.max_sessions_per_peer,
            "max_context": self.max_context, "chunk": self.chunk, "cache_bytes": self.limits.cache_bytes,
            "cache_used": self.cache_used, "stats": dict(self.stats), "threads": torch.get_num_threads(),
            "max_batch": self.limits.max_batch, "card": self.card.encode() if self.card else None,
        }  # fmt: skip

    async def _close(self, payload: Any, ctx: Any) -> bool:
        session = _session_id(payload)
        return self._sessions.pop((str(ctx.peer), session), None) is not None

    async def _forward(self, payload: Any, ctx: Any) -> dict:
        req = self._parse(payload)
        sizes = [x.shape[1] for x in req["inputs"]]
        self._check_size(req, sizes)
        key = (str(ctx.peer), req["session"])
        session = self._open_session(key, req)
        async with session.lock:
            if session.cache.length != req["pos"]:
                raise SessionError(f"position {req['pos']} does not match the cache ({session.cache.length})")
            need = sum(sizes) * self.stage.config.kv_bytes_per_token(req["end"] - req["start"])
            try:
                self._reserve_cache(key, need)
            except CacheFull:
                if req["pos"] == 0:
                    self._sessions.pop(key, None)
                raise
            try:
                outputs = await self._run(session, req)
            except BaseException:
                self._sessions.pop(key, None)  # the cache may be half-updated: the client replays
                raise
            session.last_used = time.monotonic()
        self.stats["forwards"] += 1
        self.stats["tokens"] += sum(sizes)
        self.stats["replays"] += len(req["inputs"]) > 1
        return {"outputs": outputs}

    def _check_size(self, req: dict, sizes: list[int]) -> None:
        """Context length and reply size, before any session is touched."""
        total = req["pos"] + sum(sizes)
        if total > self.max_context:
            self.stats["refused"] += 1
            raise RequestTooLarge(f"the session would have {total} positions; this server allows "
                                  f"{self.max_context}")  # fmt: skip
        size = reply_bytes(self.stage.config, sizes, req["end"], req["want"], req["logits"])
        if size > self.limits.max_reply_bytes:
            self.stats["refused"] += 1
            raise RequestTooLarge(f"the reply would be {size} bytes; this server sends at most "
                                  f"{self.limits.max_reply_bytes}")  # fmt: skip

    def _reserve_cache(self, key: tuple[str, str], need: int) -> None:
        """Room for ``need`` more KV bytes, giving up idle sessions (pressure_ttl) if that makes it."""
        while self.cache_used + need > self.limits.cache_bytes:
            victim = self._oldest_idle(exclude=key)
            if victim is None:
                self.stats["refused"] += 1
                raise CacheFull(f"KV-cache budget of {self.limits.cache_bytes} bytes would be exceeded")
            self._evict(victim)

    async def _run(self, session: _Session, req: dict) -> list[torch.Tensor]:
        """Each input in order, each in chunks of at most ``self.chunk`` positions, one step each."""
        outs = []
        last_stage = req["end"] == self.stage.config.n_layers
        for i, x in enumerate(req["inputs"]):
            keep = req["want"] == "all" or i == len(req["inputs"]) - 1
            bounds = chunk_bounds(x.shape[1], self.chunk)
            pieces = []
            for j, (a, b) in enumerate(bounds):
                head = keep and (req["logits"] == "all" or j == len(bounds) - 1)  # logits someone reads
                y = await self._step(session, x[:, a:b], req, head)
                if keep and (head or not last_stage):
                    pieces.append(y)
            if keep:
                y = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
                outs.append(y[:, -1:, :] if last_stage and req["logits"] == "last" else y)
        return outs

    async def _step(self, session: _Session, x: torch.Tensor, req: dict, head: bool) -> torch.Tensor:
        """One step of ``session``, run by the compute task in a batch with other sessions' steps."""
        step = _Step(session, x.contiguous(), (req["start"], req["end"]), head)
        self._waiting.append(step)
        self._work.set()
        try:
            await step.done.wait()
        except BaseException:
            if step in self._waiting:  # not started: nobody computes it
                self._waiting.remove(step)
            raise
        if step.error is not None:
            raise step.error
        assert step.output is not None
        return step.output

    async def _compute_loop(self) -> None:
        """Runs the waiting steps, oldest first, in batches (plan_batch); threads change in between."""
        while True:
            await trio.lowlevel.checkpoint()  # let steps that have arrived join this batch
            while not self._waiting:
                self._work = trio.Event()
                await self._work.wait()
            rows = [(s.blocks, s.x.shape[1]) for s in self._waiting]
            chosen = plan_batch(rows, self.limits.max_batch, max(self.chunk, 1))
            batch = [self._waiting[i] for i in chosen]
            for i in reversed(chosen):
                del self._waiting[i]
            self._apply_threads()
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Step]) -> None:
        xs = [s.x for s in batch]
        caches: list[KVCache | None] = [s.session.cache for s in batch]
        start, end = batch[0].blocks
        args = (xs, caches, start, end, [s.head for s in batch])
        t0 = time.perf_counter()
        self._computing = True
        try:
            if sum(x.shape[1] for x in xs) <= self.limits.inline_tokens:  # decode steps: tens of ms
                outputs = self.stage.forward_batch(*args)
            else:  # a prompt chunk, a replay or a big batch: keep the node's loop responsive
                outputs = await trio.to_thread.run_sync(self.stage.forward_batch, *args)
        except Exception as exc:
            for s in batch:
                s.error = exc
        else:
            for s, y in zip(batch, outputs, strict=True):
                s.output = y
        finally:
            self._computing = False
            for s in batch:
                if s.output is None and s.error is None:  # cancelled: the server is stopping
                    s.error = MeshError("the stage server is stopping")
                s.done.set()
        elapsed = time.perf_counter() - t0
        self.stats["steps"] += 1
        self.stats["batched"] += len(batch)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
        self.stats["compute_s"] += elapsed
        self.stats["max_step_s"] = max(self.stats["max_step_s"], round(elapsed, 4))

    def _open_session(self, key: tuple[str, str], req: dict) -> _Session:
        session = self._sessions.get(key)
        if req["pos"] == 0:
            if session is None:
                self._admit(key)
            if session is None or session.lock.locked() is False:
                session = self._sessions[key] = _Session(req["start"], req["end"])
            return session
        if session is None:
            raise SessionError(f"unknown or expired session {req['session']!r}")
        if (session.start, session.end) != (req["start"], req["end"]):
            raise SessionError("the session was opened for other blocks")
        session.last_used = time.monotonic()
        return session

    def _admit(self, key: tuple[str, str]) -> None:
        """Room for a new session of peer key[0]: its own cap, then the server's (pick_victim)."""
        peer, limits = key[0], self.limits
        held = sum(1 for k in self._sessions if k[0] == peer)
        if held >= limits.max_sessions_per_peer:
            victim = self._oldest_idle(peer=peer)
            if victim is None:
                self.stats["refused"] += 1
                raise ServerBusy(f"this peer holds {held} of the {limits.max_sessions_per_peer} sessions a "
                                 "peer may have")  # fmt: skip
            self._evict(victim)
        if len(self._sessions) >= limits.max_sessions:
            rows = [(k, k[0], s.last_used, s.lock.locked()) for k, s in self._sessions.items()]
            victim = pick_victim(rows, peer, time.monotonic(), limits.pressure_ttl)
            if victim is None:
                self.stats["refused"] += 1
                raise ServerBusy(f"server has {len(self._sessions)} of {limits.max_sessions} sessions")
            self._evict(victim)

    def _oldest_idle(self, peer: str | None = None, exclude: Any = None) -> tuple[str, str] | None:
        """The longest idle session (idle >= pressure_ttl, no step in flight), of ``peer`` if given."""
        cutoff = time.monotonic() - self.limits.pressure_ttl
        idle = [(s.last_used, k) for k, s in self._sessions.items()
                if k != exclude and (peer is None or k[0] == peer) and s.last_used <= cutoff
                and not s.lock.locked()]  # fmt: skip
        return min(idle)[1] if idle else None

    def _evict(self, key: tuple[str, str]) -> None:
        if self._sessions.pop(key, None) is not None:
            self.stats["evicted"] += 1
            log.debug("mesh session %s of %s given up for a newcomer", key[1], key[0])

    def _parse(self, payload: Any) -> dict:
        """Validate every field before any compute (sizes, dtypes, shapes, ranges)."""
        if not isinstance(payload, dict):
            raise PayloadError("mesh.forward takes a map")
        c, stage = self.stage.config, self.stage
        start, end, pos = payload.get("start"), payload.get("end"), payload.get("pos")
        if type(start) is not int or type(end) is not int or type(pos) is not int:
            raise PayloadError("start, end and pos must be integers")
        if not stage.start <= start < end <= stage.end:
            raise PayloadError(f"blocks {start}:{end} are not served here ({stage.start}:{stage.end})")
        if pos < 0:
            raise PayloadError("pos must be >= 0")
        want, logits = payload.get("want", "last"), payload.get("logits", "all")
        if want not in ("all", "last") or logits not in ("all", "last"):
            raise PayloadError("want and logits are 'all' or 'last'")
        inputs = payload.get("inputs")
        if not isinstance(inputs, list) or not 1 <= len(inputs) <= self.limits.max_inputs:
            raise PayloadError(f"inputs must be a list of 1..{self.limits.max_inputs} tensors")
        tensors, total = [], 0
        for x in inputs:
            if not isinstance(x, torch.Tensor | np.ndarray):
                raise PayloadError("inputs must be tensors")
            x = torch.as_tensor(x)
            if start == 0:
                if x.dtype != torch.int64 or x.dim() != 2 or x.shape[0] != 1:
                    raise PayloadError("the first stage takes token ids, int64 [1, T]")
                if x.numel() and (int(x.min()) < 0 or int(x.max()) >= c.vocab_size):
                    raise PayloadError("token id out of range")
            elif x.dtype != torch.float32 or x.dim() != 3 or x.shape[0] != 1 or x.shape[2] != c.hidden:
                raise PayloadError(f"hidden states must be float32 [1, T, {c.hidden}]")
            if x.shape[1] < 1:
                raise PayloadError("an input has no tokens")
            total += x.shape[1]
            tensors.append(x)
        if total > self.limits.max_tokens_per_call:
            raise PayloadError(f"more than {self.limits.max_tokens_per_call} tokens in one call")
        return {"session": _session_id(payload), "start": start, "end": end, "pos": pos, "inputs": tensors,
                "want": want, "logits": logits}  # fmt: skip


def _session_id(payload: Any) -> str:
    session = payload.get("session") if isinstance(payload, dict) else None
    if not isinstance(session, str) or not 1 <= len(session) <= MAX_SESSION_ID:
        raise PayloadError(f"session must be a string of 1..{MAX_SESSION_ID} characters")
    return session
