"""A stage server: a node service that runs blocks [start, end) for clients' sessions.

RPC methods (payloads are msgpack values with tensors, never pickle):

- ``mesh.forward`` {session, start, end, pos, inputs: [tensor, ...], want: "all"|"last",
  logits: "all"|"last"} -> {outputs: [tensor, ...]}. ``pos == 0`` opens (or restarts) the session;
  otherwise ``pos`` must equal the session's cache length. Several inputs are run in order, as if
  sent one call each: that is how a client replays its history to rebuild a cache bitwise.
- ``mesh.close`` {session} -> bool; ``mesh.info`` -> what the server holds and its limits.

The server announces itself under ``mesh/<model id>`` in the DHT (its own subkey, refreshed every
``announce_interval``, expiring after three missed refreshes).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import trio

from lattice.apps.mesh_inference.errors import CacheFull, ServerBusy, SessionError
from lattice.apps.mesh_inference.model import KVCache, Stage
from lattice.apps.mesh_inference.routing import ServerInfo, announcement_key
from lattice.errors import LatticeError, PayloadError

log = logging.getLogger(__name__)

MAX_SESSION_ID = 64


@dataclass
class ServerLimits:
    max_sessions: int = 16
    cache_bytes: int = 512 << 20  # KV-cache budget over all sessions
    session_ttl: float = 300.0  # an idle session is dropped after this
    max_inputs: int = 8192  # inputs in one call (a replay sends one per step so far)
    max_tokens_per_call: int = 8192
    # calls of at most this many tokens (decode steps) run on the event loop: a thread hop costs a
    # wake-up, which on a busy machine was a large part of the mesh's per-token overhead
    inline_tokens: int = 4


@dataclass
class _Session:
    start: int
    end: int
    cache: KVCache = field(default_factory=KVCache)
    last_used: float = field(default_factory=time.monotonic)
    lock: trio.Lock = field(default_factory=trio.Lock)


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
    ) -> None:
        self.stage: Stage = stage if isinstance(stage, Stage) else None  # type: ignore[assignment]
        self._loader = None if isinstance(stage, Stage) else stage
        self.ready = trio.Event()  # set once the stage is loaded, served and announced
        self.model_id = model_id
        self.limits = limits or ServerLimits()
        self.announce_interval = announce_interval
        self.throughput = throughput
        self.node: Any = None
        self._sessions: dict[tuple[str, str], _Session] = {}
        self._compute = trio.Lock()  # one forward at a time: sessions interleave per step
        self.stats = {"forwards": 0, "tokens": 0, "replays": 0, "refused": 0, "expired": 0,
                      "compute_s": 0.0}  # fmt: skip

    # -- lifecycle
    async def run(self, node: Any, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Starts at once (the node can finish starting and join the network); a loader given
        instead of a stage runs first (it may look at the DHT), then the methods are served."""
        self.node = node
        task_status.started()
        if self.stage is None:
            assert self._loader is not None
            self.stage = await self._loader(node)
        if self.throughput is None:
            self.throughput = await trio.to_thread.run_sync(self._measure)
        # the largest valid request (max_tokens_per_call hidden states): larger ones are refused unread
        max_request = self.limits.max_tokens_per_call * max(4 * self.stage.config.hidden, 8) + (1 << 20)
        node.rpc.register("mesh.forward", self._forward, max_payload=max_request)
        node.rpc.register("mesh.close", self._close)
        node.rpc.register("mesh.info", self._info)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._announce_loop)
            nursery.start_soon(self._expire_loop)
            await trio.sleep_forever()

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

    def info(self) -> ServerInfo:
        return ServerInfo(
            str(self.node.peer_id), self.stage.start, self.stage.end, self.stage.config.n_layers,
            float(self.throughput or 0.0), free_memory(), max(0, self.limits.cache_bytes - self.cache_used),
            len(self._sessions), self.limits.max_sessions, tuple(self.node.addrs[:8]),
        )  # fmt: skip

    async def announce(self) -> int:
        """Publish this server's entry now; returns how many peers stored it."""
        return await self.node.dht.put(
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
            "max_sessions": self.limits.max_sessions, "cache_bytes": self.limits.cache_bytes,
            "cache_used": self.cache_used, "stats": dict(self.stats), "threads": torch.get_num_threads(),
        }  # fmt: skip

    async def _close(self, payload: Any, ctx: Any) -> bool:
        session = _session_id(payload)
        return self._sessions.pop((str(ctx.peer), session), None) is not None

    async def _forward(self, payload: Any, ctx: Any) -> dict:
        req = self._parse(payload)
        key = (str(ctx.peer), req["session"])
        session = self._open_session(key, req)
        async with session.lock:
            if session.cache.length != req["pos"]:
                raise SessionError(f"position {req['pos']} does not match the cache ({session.cache.length})")
            n_tokens = sum(x.shape[1] for x in req["inputs"])
            need = n_tokens * self.stage.config.kv_bytes_per_token(req["end"] - req["start"])
            if self.cache_used + need > self.limits.cache_bytes:
                self.stats["refused"] += 1
                if req["pos"] == 0:
                    self._sessions.pop(key, None)
                raise CacheFull(f"KV-cache budget of {self.limits.cache_bytes} bytes would be exceeded")
            if req["pos"] + n_tokens > self.stage.config.max_positions:
                raise SessionError(f"the session would exceed {self.stage.config.max_positions} positions")
            try:
                async with self._compute:
                    if n_tokens <= self.limits.inline_tokens:  # a decode step: tens of ms at most
                        outputs = self._run(session, req)
                    else:  # a prompt or a replay: keep the node's loop responsive
                        outputs = await trio.to_thread.run_sync(self._run, session, req)
            except BaseException:
                self._sessions.pop(key, None)  # the cache may be half-updated: the client replays
                raise
            session.last_used = time.monotonic()
        self.stats["forwards"] += 1
        self.stats["tokens"] += n_tokens
        self.stats["replays"] += len(req["inputs"]) > 1
        return {"outputs": outputs}

    def _run(self, session: _Session, req: dict) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        try:
            return self._run_inputs(session, req)
        finally:
            self.stats["compute_s"] += time.perf_counter() - t0

    def _run_inputs(self, session: _Session, req: dict) -> list[torch.Tensor]:
        outs = []
        last = len(req["inputs"]) - 1
        for i, x in enumerate(req["inputs"]):
            y = self.stage.forward(x, session.cache, req["start"], req["end"])
            if req["want"] == "all" or i == last:
                if req["end"] == self.stage.config.n_layers and req["logits"] == "last":
                    y = y[:, -1:, :]
                outs.append(y)
        return outs

    def _open_session(self, key: tuple[str, str], req: dict) -> _Session:
        session = self._sessions.get(key)
        if req["pos"] == 0:
            if session is None and len(self._sessions) >= self.limits.max_sessions:
                self.stats["refused"] += 1
                raise ServerBusy(f"server has {len(self._sessions)} of {self.limits.max_sessions} sessions")
            if session is None or session.lock.locked() is False:
                session = self._sessions[key] = _Session(req["start"], req["end"])
            return session
        if session is None:
            raise SessionError(f"unknown or expired session {req['session']!r}")
        if (session.start, session.end) != (req["start"], req["end"]):
            raise SessionError("the session was opened for other blocks")
        session.last_used = time.monotonic()
        return session

    def _parse(self, payload: Any) -> dict:
        """Validate every field before any compute (sizes, dtypes, shapes, ranges)."""
        if not isinstance(payload, dict):
            raise PayloadError("mesh.forward takes a map")
        c, stage = self.stage.config, self.stage
        start, end, pos = payload.get("start"), payload.get("end"), payload.get("pos")
        if not all(type(v) is int for v in (start, end, pos)):
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
