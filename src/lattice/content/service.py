"""The content service (``node.content``): add content, find it in the DHT, fetch it from many peers.

    cid = await node.content.add("model.safetensors")        # or bytes, or a dict of numpy arrays
    path = await node.content.get(cid, "out.safetensors")      # from every provider the DHT knows
    weights = await node.content.get_tensors(cid, ["h.0.w"])   # only the chunks holding those tensors

Built only on the node's public services: ``node.rpc`` (two server-streaming methods, see
lattice.content.protocol) and ``node.dht`` (provide / find_providers). Pinned complete content is
announced, re-announced every ``announce_interval`` and no longer announced once unpinned.

Serving: every inbound request is admitted against the node's limits before any disk read or
allocation: concurrent requests per peer (``serve_peer_requests``) and in all
(``serve_max_requests``, with ``serve_min_per_peer`` kept for each peer so a crowd cannot lock out a
newcomer), a lease of one chunk on the peer's memory budget (the node's resource manager, service
"content"), and optionally bytes per second per peer (``serve_peer_rate``). A malformed request costs
the peer misbehaviour points; a refusal tells it ``ContentBusy``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from lattice._files import exclusive_temp
from lattice._lazy import lazy_module
from lattice.content import protocol
from lattice.content.cid import ContentId
from lattice.content.config import DEFAULT_MAX_BYTES, ContentConfig
from lattice.content.errors import ContentBusy, ContentError, ContentNotFound, PayloadError
from lattice.content.fetch import Fetch
from lattice.content.manifest import Manifest, safetensors_metadata
from lattice.content.store import COMPLETE, Reader, Store
from lattice.dht.service import DHT
from lattice.errors import LatticeError
from lattice.identity import PeerId
from lattice.multiaddr import Multiaddr
from lattice.rpc.errors import RemoteError
from lattice.rpc.service import RPC
from lattice.service import ServiceContext
from lattice.transport.limits import PENALTY_MALFORMED, TokenBucket
from lattice.transport.resources import ResourceLimitExceeded

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")  # loaded with the first chunk or tensor (lattice._lazy)

__all__ = ["Admission", "Content", "ContentConfig", "ReadAhead"]

log = logging.getLogger(__name__)

MAX_TRACKED_PEERS = 4096


class ReadAhead:
    """The chunks of one request read one ahead of the sender: chunk i+1 comes off the disk (and is
    hashed, if need be) in a worker thread while chunk i is on the wire. :meth:`run` is a task of
    the service's nursery and owns the reader: it closes it after its last read, also when the
    request ends early (:meth:`close`), so a read in flight never meets a closed descriptor."""

    def __init__(
        self,
        reader: Reader,
        indices: list[int],
        buffers: int,
        limiter: trio.CapacityLimiter,
        on_done: Callable[[Reader], None],
    ) -> None:
        self.reader = reader
        self.indices = indices
        self.limiter = limiter
        self.on_done = on_done
        self.scope = trio.CancelScope()
        self.error: str | None = None
        self._ready_send, self._ready = trio.open_memory_channel(buffers)
        self._free_send, self._free = trio.open_memory_channel(buffers)
        size = reader.manifest.chunk_size
        for _ in range(buffers):
            self._free_send.send_nowait(np.empty(size, np.uint8))

    async def run(self) -> None:
        try:
            with self.scope:
                async with self._ready_send:
                    for index in self.indices:
                        buf = await self._free.receive()
                        bad = len(self.reader.bad)
                        data = self.reader.read_now(index, buf)  # cached and known good: no thread
                        if data is None:
                            data = await trio.to_thread.run_sync(
                                self.reader.read, index, buf, limiter=self.limiter
                            )
                        await self._ready_send.send((index, data, len(self.reader.bad) > bad, buf))
        except OSError as exc:  # the disk failed: the request ends with an error
            self.error = exc.strerror or str(exc)
        finally:
            self.reader.close()
            self.on_done(self.reader)

    async def next(self) -> tuple[int, np.ndarray | None, bool, np.ndarray]:
        """(index, chunk bytes or None, found corrupt, its buffer: :meth:`recycle` it once the
        chunk is sent) of the next chunk, in request order."""
        try:
            return await self._ready.receive()
        except trio.EndOfChannel:
            raise ContentError(f"cannot read {self.reader.key}: {self.error or 'stopped'}") from None

    def recycle(self, buf: np.ndarray) -> None:
        """A chunk was sent (or found missing): its buffer may take the next read."""
        self._free_send.send_nowait(buf)

    def close(self) -> None:
        self.scope.cancel()


class Admission:
    """Concurrent requests per peer and in all (pure bookkeeping)."""

    def __init__(self, total: int, per_peer: int, min_per_peer: int) -> None:
        self.total, self.per_peer, self.min_per_peer = total, per_peer, min_per_peer
        self.active = 0
        self.peers: dict[Hashable, int] = {}

    def refusal(self, peer: Hashable) -> str | None:
        """Why a new request from ``peer`` is refused now, or None (then call :meth:`begin`)."""
        mine = self.peers.get(peer, 0)
        if mine >= self.per_peer:
            return f"too many requests in progress from this peer (limit {self.per_peer})"
        if self.active >= self.total and mine >= self.min_per_peer:
            return f"too many requests in progress (limit {self.total})"
        return None

    def begin(self, peer: Hashable) -> None:
        self.active += 1
        self.peers[peer] = self.peers.get(peer, 0) + 1

    def end(self, peer: Hashable) -> None:
        self.active -= 1
        left = self.peers.get(peer, 1) - 1
        if left > 0:
            self.peers[peer] = left
        else:
            self.peers.pop(peer, None)


def _admission(cfg: ContentConfig) -> Admission:
    return Admission(cfg.serve_max_requests, cfg.serve_peer_requests, cfg.serve_min_per_peer)


def _summary(progress: dict) -> dict:
    """What a finished fetch did (all zero if the content was here already)."""
    keys = ("chunks", "had", "fetched", "bytes", "elapsed_s", "duplicates")
    return {k: progress.get(k, 0) for k in keys}


def _bounded_put(table: OrderedDict, key: Any, value: Any) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > MAX_TRACKED_PEERS:
        table.popitem(last=False)


class Content:
    name = "content"

    def __init__(self, config: ContentConfig | None = None) -> None:
        self.config = config or ContentConfig()
        self._ctx: ServiceContext | None = None
        self.store: Store | None = None
        self.admission = _admission(self.config)
        self.served: OrderedDict[str, int] = OrderedDict()  # peer -> bytes served
        self.bad_providers: OrderedDict[str, tuple[float, str]] = OrderedDict()  # peer -> (until, why)
        self.fetches: dict[str, Fetch] = {}
        self.scores: OrderedDict[str, dict] = OrderedDict()  # provider -> how its fetches went
        self._locks: dict[str, trio.Lock] = {}
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()
        self._announced: set[str] = set()
        self._disk = trio.CapacityLimiter(4)  # worker threads reading and hashing served chunks
        self._nursery: trio.Nursery | None = None
        self.counters = {"requests": 0, "refused": 0, "malformed": 0, "chunks_served": 0, "bytes_served": 0,
                      "chunks_hashed": 0, "chunks_fetched": 0, "bytes_fetched": 0,
                      "chunks_copied": 0, "write_calls": 0, "bad_chunks": 0}  # fmt: skip

    # -- lifecycle
    @property
    def ctx(self) -> ServiceContext:
        if self._ctx is None:
            raise ContentError("the content service is not running")
        return self._ctx

    @property
    def rpc(self) -> RPC:
        rpc = self.ctx.service("rpc", RPC)
        if rpc is None:
            raise ContentError("the content service needs the node's RPC service")
        return rpc

    async def run(self, ctx: ServiceContext, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        self._ctx = ctx
        cfg = self.config
        max_bytes = cfg.max_bytes if cfg.max_bytes is not None else DEFAULT_MAX_BYTES
        root = ctx.data_dir / "content"
        self.store = Store(root, max_bytes, cfg.max_manifest, cfg.verify_on_open, cfg.direct_writes)
        await trio.to_thread.run_sync(self.store.open)
        rpc = self.rpc
        # requests are small maps (a content id, chunk indexes): 4 KiB is plenty
        rpc.register(protocol.MANIFEST, self._serve_manifest, stream="server", max_payload=4096)
        rpc.register(protocol.CHUNKS, self._serve_chunks, stream="server", max_payload=4096)
        for name, op in (
            ("content.add", self._op_add),
            ("content.get", self._op_get),
            ("content.pins", self._op_pins),
            ("content.pin", self.pin),
            ("content.unpin", self.unpin),
            ("content.gc", self.gc),
            ("content.status", self.status),
            ("content.verify", self.verify),
        ):
            ctx.add_control_op(name, op)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._announce_loop)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.store.close()

    def _require_store(self) -> Store:
        if self.store is None:
            raise ContentError("the content service is not running")
        return self.store

    def _dht(self) -> DHT | None:
        return self._ctx.service("dht", DHT) if self._ctx is not None else None

    # -- adding
    async def add(
        self, source: str | os.PathLike | bytes | dict, *, pin: bool = True, chunk_size: int | None = None
    ) -> ContentId:
        """Add a file (a path), bytes, or a dict of numpy arrays (stored as a safetensors file) and
        return its id; pinned content is announced in the DHT."""
        store = self._require_store()
        size = chunk_size or self.config.chunk_size
        if isinstance(source, bytes | bytearray | memoryview):
            cid = await trio.to_thread.run_sync(self._add_bytes, store, bytes(source), size)
        elif isinstance(source, dict):
            cid = await trio.to_thread.run_sync(self._add_tensors, store, source, size)
        else:
            path = Path(source)
            if not path.is_file():
                raise ContentError(f"{path} is not a file")
            cid = await trio.to_thread.run_sync(store.add_file, path, size)
        if pin:
            store.pin(cid)
            self._announce_soon(cid)
        return cid

    @staticmethod
    def _add_bytes(store: Store, data: bytes, chunk_size: int) -> ContentId:
        fd, tmp = exclusive_temp(store.root / "data", "add", ".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            return store.add_file(tmp, chunk_size, kind="blob", move=True)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _add_tensors(store: Store, tensors: dict, chunk_size: int) -> ContentId:
        from safetensors.numpy import save_file

        if not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in tensors.items()):
            raise ContentError(
                "add a dict of numpy arrays by name (torch users: safetensors.torch.save_file)"
            )
        fd, tmp = exclusive_temp(store.root / "data", "add", ".safetensors")
        os.close(fd)
        try:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
            return store.add_file(tmp, chunk_size, kind="safetensors", move=True)
        finally:
            tmp.unlink(missing_ok=True)

    # -- fetching
    async def get(
        self,
        cid: str | ContentId,
        dest: str | os.PathLike | None = None,
        *,
        providers: list[str] | None = None,
        pin: bool = True,
        on_progress: Callable[[dict], None] | None = None,
        max_size: int | None = None,
        discover: bool = True,
    ) -> Path:
        """Fetch ``cid`` into the store (from ``providers``, multiaddrs or peer ids, and those the DHT
        knows), verified chunk by chunk; resumes what an interrupted fetch left. Returns the stored
        file, or ``dest`` (a copy) if given. ``max_size``: refuse content larger than this (checked
        on the manifest, before any chunk is fetched). ``discover=False``: only the ``providers``
        given (e.g. peers you trust), no DHT lookup."""
        store = self._require_store()
        cid = ContentId.parse(cid)
        await self._fetch(cid, None, providers, pin, on_progress, max_size, discover)
        if pin:
            store.pin(cid)
            self._announce_soon(cid)
        if dest is not None:
            return await trio.to_thread.run_sync(store.export, cid, Path(dest))
        return store.data_path(cid)

    async def get_tensors(
        self, cid: str | ContentId, names: list[str], *, providers: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Only the tensors ``names`` of a safetensors content, fetching only the chunks that hold
        them (kept in the store, unpinned, for the next call). bfloat16 and float8 tensors come back
        as their raw words (uint16 / uint8)."""
        store = self._require_store()
        cid = ContentId.parse(cid)
        manifest = await self._manifest(cid, providers)
        wanted = manifest.chunks_for(names)
        await self._fetch(cid, wanted, providers, False, None)
        return await trio.to_thread.run_sync(store.tensors, cid, names)

    async def metadata(
        self, cid: str | ContentId, *, providers: list[str] | None = None, max_bytes: int | None = None
    ) -> dict[str, str]:
        """The ``__metadata__`` of a safetensors content (what a model's file says about itself:
        its config, its tokenizer), fetching only the chunks of its header, at most ``max_bytes``
        (default ``ContentConfig.max_metadata``)."""
        store = self._require_store()
        cid = ContentId.parse(cid)
        manifest = await self._manifest(cid, providers)
        if manifest.kind != "safetensors" or manifest.size < 8:
            raise ContentError(f"{cid} is not a safetensors file")
        limit = min(max_bytes or self.config.max_metadata, manifest.size)
        await self._fetch(cid, list(manifest.chunks_in(0, 8)), providers, False, None)
        n = int.from_bytes(await trio.to_thread.run_sync(store.read_range, cid, 0, 8), "little")
        if 8 + n > limit:
            raise ContentError(f"the header of {cid} is {8 + n} bytes, more than the {limit} allowed")
        await self._fetch(cid, list(manifest.chunks_in(0, 8 + n)), providers, False, None)
        return safetensors_metadata(await trio.to_thread.run_sync(store.read_range, cid, 8, 8 + n))

    async def _manifest(self, cid: ContentId, providers: list[str] | None) -> Manifest:
        """The manifest of ``cid``: the stored one, else one from a provider (stored, the object
        left partial with no chunk)."""
        store = self._require_store()
        manifest = store.manifest(cid)
        if manifest is None:
            raw = await self._find_manifest(cid, await self._providers(cid, providers))
            partial = store.begin(cid, raw)
            store.release(partial)
            manifest = store.manifest(cid)
            assert manifest is not None
        return manifest

    async def _fetch(
        self,
        cid: ContentId,
        wanted: list[int] | None,
        providers: list[str] | None,
        pin: bool,
        on_progress: Callable[[dict], None] | None,
        max_size: int | None = None,
        discover: bool = True,
    ) -> None:
        store = self._require_store()
        key = str(cid)
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:  # one fetch of an object at a time; a second caller waits, then finds it
            try:
                if store.state(cid) == COMPLETE:
                    return
                # named providers start at once and the DHT's join as they are found (a lookup
                # takes a few RTTs); with none named the lookup is all there is
                named_first = bool(providers) and discover
                candidates = await self._providers(cid, providers, discover=discover and not providers)
                raw = store.manifest_bytes(cid)
                if raw is None:
                    try:
                        raw = await self._find_manifest(cid, candidates)
                    except ContentNotFound:
                        if not named_first:
                            raise
                        candidates = await self._providers(cid, providers)  # and the DHT's
                        raw = await self._find_manifest(cid, candidates)
                if max_size is not None:
                    size = Manifest.decode(raw, self.config.max_manifest).size
                    if size > max_size:
                        raise ContentError(f"{cid} is {size} bytes, more than the {max_size} asked for")
                partial = store.begin(cid, raw)
                if pin:
                    store.pin(cid)
                fetch = Fetch(
                    self.rpc,
                    partial,
                    self.config.fetch,
                    wanted=wanted,
                    on_bad=self._on_bad_provider,
                    on_progress=on_progress,
                    skip=self._is_bad,
                )
                self.fetches[key] = fetch
                try:
                    await fetch.run(
                        candidates,
                        (lambda: self._providers(cid, None)) if discover else None,  # only the named
                        discover_now=named_first,
                    )
                    if partial.complete:
                        await trio.to_thread.run_sync(store.finish, partial)
                finally:
                    self.counters["chunks_fetched"] += fetch.fetched
                    self.counters["bytes_fetched"] += fetch.fetched_bytes
                    self.counters["chunks_copied"] += partial.bounced  # O_DIRECT through a bounce buffer
                    self.counters["write_calls"] += fetch.write_calls  # worker-thread hops, a batch each
                    self._score(fetch)
                    self.fetches.pop(key, None)
                    store.release(partial)
            finally:
                if not lock.statistics().tasks_waiting:
                    self._locks.pop(key, None)

    async def _providers(
        self, cid: ContentId, explicit: list[str] | None, discover: bool = True
    ) -> list[tuple[str, str]]:
        """(peer id, dial target) of providers: the ones given, then (``discover``) the DHT's; not us,
        not bad ones."""
        me = str(self.ctx.host.peer_id)
        out: dict[str, str] = {}
        for target in explicit or []:
            if target.startswith("/"):
                peer = Multiaddr.parse(target).peer_id
                if peer is None:
                    raise ContentError(f"provider address {target} must end in /p2p/<peer id>")
                out.setdefault(str(peer), target)
            else:
                out.setdefault(target, target)
        dht = self._dht() if discover else None
        if dht is not None:
            count = 2 * self.config.fetch.max_providers
            with trio.move_on_after(self.config.fetch.request_timeout):
                try:
                    for provider, _addrs in await dht.find_providers(protocol.provider_key(cid), count=count):
                        out.setdefault(provider, provider)
                except LatticeError as exc:
                    log.debug("provider lookup for %s failed: %s", cid, exc)
        found = [(p, t) for p, t in out.items() if p != me and not self._is_bad(p)]
        return sorted(found, key=lambda pt: -self.scores.get(pt[0], {}).get("rate", 0.0))

    async def _find_manifest(self, cid: ContentId, candidates: list[tuple[str, str]]) -> bytes:
        """The manifest from the first provider that has it (checked against the id)."""
        limit = self.config.max_manifest + protocol.REPLY_SLACK
        errors = []
        for peer, target in candidates:
            try:
                async with self.rpc.call_stream(
                    target,
                    protocol.MANIFEST,
                    {"cid": str(cid)},
                    timeout=self.config.fetch.request_timeout,
                    as_torch=False,
                    max_reply=limit,
                ) as items:
                    raw = None
                    async for item in items:
                        if not isinstance(item, np.ndarray) or item.dtype != np.uint8 or raw is not None:
                            raise PayloadError("a manifest reply is one uint8 array")
                        raw = item.tobytes()
                if raw is not None and cid.matches(raw):
                    return raw
                self._on_bad_provider(peer, "sent a manifest that does not hash to the id")
                errors.append(f"{peer[-8:]}: bad manifest")
            except PayloadError as exc:
                self._on_bad_provider(peer, f"malformed manifest reply: {exc}")
                errors.append(f"{peer[-8:]}: {exc}")
            except (LatticeError, trio.TooSlowError) as exc:
                errors.append(f"{peer[-8:]}: {exc}")
        tried = "; ".join(errors[:4]) if errors else "no provider found"
        raise ContentNotFound(f"no manifest for {cid} ({tried})")

    def _score(self, fetch: Fetch) -> None:
        """Remember how each provider of a fetch did (rate, chunks, why dropped): the next fetch
        tries the fastest known providers first."""
        for prov in fetch.sched.providers.values():
            row = self.scores.get(str(prov.peer)) or {"chunks": 0, "bytes": 0, "rate": 0.0, "fetches": 0}
            row["chunks"] += prov.chunks
            row["bytes"] += prov.bytes
            row["fetches"] += 1
            if prov.rate > 0:
                row["rate"] = prov.rate if row["rate"] <= 0 else 0.5 * (row["rate"] + prov.rate)
            row["dropped"] = prov.dropped
            _bounded_put(self.scores, str(prov.peer), row)

    def _on_bad_provider(self, peer: str, reason: str) -> None:
        """A provider sent bytes that are not what was asked: not used again for a while, and a
        misbehaviour point on its record (honest nodes verify what they serve)."""
        self.counters["bad_chunks"] += 1
        _bounded_put(self.bad_providers, peer, (time.monotonic() + self.config.bad_provider_ttl, reason))
        host = self._ctx.host if self._ctx is not None else None
        if host is not None:
            try:
                host.penalize(PeerId.from_string(peer), f"content: {reason}", PENALTY_MALFORMED)
            except (LatticeError, ValueError):
                pass

    def _is_bad(self, peer: str) -> bool:
        entry = self.bad_providers.get(peer)
        if entry is None:
            return False
        if entry[0] > time.monotonic():
            return True
        del self.bad_providers[peer]
        return False

    # -- serving
    def _admit(self, peer: Any) -> None:
        refusal = self.admission.refusal(peer)
        if refusal is not None:
            self.counters["refused"] += 1
            raise ContentBusy(refusal)

    def _malformed(self, peer: Any, exc: Exception) -> None:
        self.counters["malformed"] += 1
        self.ctx.host.penalize(peer, f"content: {exc}", PENALTY_MALFORMED)

    async def _serve_manifest(self, payload: Any, ctx: Any):
        try:
            cid = protocol.parse_cid(payload)
        except PayloadError as exc:
            self._malformed(ctx.peer, exc)
            raise
        self._admit(ctx.peer)
        self.admission.begin(ctx.peer)
        try:
            raw = self._require_store().manifest_bytes(cid)
            if raw is None:
                raise ContentNotFound(f"{cid} is not here")
            yield np.frombuffer(raw, np.uint8)
        finally:
            self.admission.end(ctx.peer)

    async def _serve_chunks(self, payload: Any, ctx: Any):
        """Chunks asked for, each read and verified (:class:`ReadAhead`: one ahead of the sender; a
        file that changed on disk is never passed on); ``missing`` for those this node does not have."""
        peer = ctx.peer
        store = self._require_store()
        try:
            cid, indices = protocol.parse_chunk_request(payload, self.config.max_request_chunks)
        except PayloadError as exc:
            self._malformed(peer, exc)
            raise
        manifest = store.manifest(cid)
        if manifest is None:
            raise ContentNotFound(f"{cid} is not here")
        if max(indices) >= manifest.count:
            error = PayloadError(f"chunk index out of range (the content has {manifest.count})")
            self._malformed(peer, error)
            raise error
        self._admit(peer)
        self.admission.begin(peer)
        self.counters["requests"] += 1
        lease = self.ctx.host.resources.lease(peer, self.name)
        reads: ReadAhead | None = None
        try:
            buffers = min(2, len(indices))  # one chunk on the wire, the next one being read
            try:
                lease.grow(buffers * manifest.chunk_size)
            except ResourceLimitExceeded as exc:
                self.counters["refused"] += 1
                raise ContentBusy(str(exc)) from None
            reader = store.reader(cid)
            if reader is None or self._nursery is None:
                if reader is not None:
                    reader.close()
                raise ContentNotFound(f"{cid} is not here")
            reads = ReadAhead(reader, indices, buffers, self._disk, self._read_done)
            self._nursery.start_soon(reads.run)
            for _ in indices:
                index, data, corrupt, buf = await reads.next()
                if corrupt:  # never passed on; the object becomes partial (repaired if pinned)
                    store.damaged(cid, [index])
                    self._repair_soon(cid)
                if data is None:
                    yield {"i": index, "missing": True}
                else:
                    await self._throttle(peer, data.nbytes)
                    self._count_served(peer, data.nbytes)
                    yield {"i": index, "d": data}
                reads.recycle(buf)  # sent: its buffer takes the chunk after next
        finally:  # no await here: this may run when the RPC drops the generator
            if reads is not None:
                reads.close()  # its task closes the reader once no read is in flight
            lease.close()
            self.admission.end(peer)

    def _read_done(self, reader: Reader) -> None:
        self.counters["chunks_hashed"] += reader.hashed

    async def _throttle(self, peer: Hashable, nbytes: int) -> None:
        rate = self.config.serve_peer_rate
        if rate <= 0:
            return
        now = trio.current_time()
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = TokenBucket(rate, max(rate, float(nbytes)), now)
            _bounded_put(self._buckets, peer, bucket)
        while not bucket.take(now, nbytes):
            await trio.sleep((nbytes - bucket.tokens) / rate)
            now = trio.current_time()

    def _count_served(self, peer: Any, nbytes: int) -> None:
        self.counters["chunks_served"] += 1
        self.counters["bytes_served"] += nbytes
        key = str(peer)
        _bounded_put(self.served, key, self.served.get(key, 0) + nbytes)

    def _repair_soon(self, cid: ContentId) -> None:
        """Pinned content found damaged on disk: fetch the lost chunks again (in the background)."""
        if self._nursery is not None and str(cid) in self._require_store().pinned:
            self._nursery.start_soon(self._repair, cid)

    async def _repair(self, cid: ContentId) -> None:
        try:
            await self.get(cid)
            log.info("content %s repaired", cid)
        except LatticeError as exc:
            log.warning("content %s is damaged and could not be repaired yet: %s", cid, exc)

    # -- announcing
    def _announce_soon(self, cid: ContentId) -> None:
        if self._nursery is not None and self._dht() is not None:
            self._nursery.start_soon(self._announce, str(cid))

    async def _announce(self, key: str) -> None:
        store = self._require_store()
        if key not in store.pinned or store.state(key) != COMPLETE:
            return
        dht = self._dht()
        if dht is None:
            return
        try:
            with trio.move_on_after(60):
                await dht.provide(protocol.provider_key(ContentId.parse(key)))
                self._announced.add(key)
        except LatticeError as exc:
            log.debug("announcing %s failed: %s", key, exc)

    async def _announce_loop(self) -> None:
        """Soon after start (once the DHT may know peers), then every ``announce_interval``: announce
        pinned content; pinned content found damaged when the store opened is repaired."""
        store = self._require_store()
        await trio.sleep(min(5.0, self.config.announce_interval))
        for key in store.damaged_objects():
            if key in store.pinned:
                self._repair_soon(ContentId.parse(key))
        while True:
            for key in sorted(store.pinned):
                await self._announce(key)
            await trio.sleep(self.config.announce_interval)

    # -- pins, status (also control operations)
    async def pin(self, cid: str) -> None:
        """Keep ``cid`` (no GC) and announce it."""
        store = self._require_store()
        store.pin(ContentId.parse(cid))
        self._announce_soon(ContentId.parse(cid))

    async def unpin(self, cid: str) -> bool:
        """Let GC drop ``cid`` and stop announcing it (DHT entries others hold expire in a day)."""
        store = self._require_store()
        parsed = ContentId.parse(cid)
        changed = store.unpin(parsed)
        self._announced.discard(str(parsed))
        dht = self._dht()
        if dht is not None:
            dht.unprovide(protocol.provider_key(parsed))
        return changed

    async def pins(self) -> list[dict]:
        return [row for row in self._require_store().listing() if row["pinned"]]

    async def gc(self) -> dict:
        """Drop unpinned content now."""
        return self._require_store().gc()

    async def verify(self, cid: str) -> dict:
        """Re-hash every chunk of a stored object; corrupt ones are dropped and, if pinned, refetched."""
        parsed = ContentId.parse(cid)
        bad = await trio.to_thread.run_sync(self._require_store().verify, parsed)
        if bad:
            self._repair_soon(parsed)
        return {"cid": cid, "bad_chunks": bad}

    def stats(self) -> dict:
        """Requests, chunks and refusals counted since start; transfers in progress (JSON-able)."""
        return {**self.counters, "serving": self.admission.active, "fetching": len(self.fetches)}

    async def status(self) -> dict:
        store = self._require_store()
        return {
            "store": store.usage(),
            "objects": store.listing(),
            "serving": {"active": self.admission.active, "peers": len(self.admission.peers), **self.counters},
            "fetching": {key: fetch.progress() for key, fetch in self.fetches.items()},
            "bad_providers": {p: why for p, (_, why) in self.bad_providers.items()},
            "providers": dict(list(self.scores.items())[-32:]),
            "announced": len(self._announced),
        }

    # -- control operations
    async def _op_add(self, path: str, pin: bool = True, chunk_size: int | None = None) -> dict:
        cid = await self.add(Path(path), pin=pin, chunk_size=chunk_size)
        manifest = self._require_store().manifest(cid)
        return {"cid": str(cid), "size": manifest.size if manifest else 0}

    async def _op_get(
        self,
        cid: str,
        output: str | None = None,
        providers: list[str] | None = None,
        pin: bool = True,
        discover: bool = True,
    ):
        """Streams progress dicts, then {"done": True, "path": ...}."""
        send, receive = trio.open_memory_channel(1)
        result: dict = {}
        last: dict = {}

        def on_progress(progress: dict) -> None:
            last.update(progress)
            try:
                send.send_nowait(progress)
            except trio.WouldBlock:
                pass  # the client is slow: it gets the next one

        async def run() -> None:
            async with send:
                try:
                    if not isinstance(discover, bool):
                        raise ContentError("discover must be true or false")
                    path = await self.get(
                        cid, output, providers=providers, pin=pin, on_progress=on_progress, discover=discover
                    )
                    result.update(done=True, path=str(path), **_summary(last))
                except (LatticeError, RemoteError) as exc:
                    result.update(done=False, error=str(exc))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            async with receive:
                async for progress in receive:
                    yield progress
        if result.get("error"):
            raise ContentError(result["error"])
        yield result

    async def _op_pins(self) -> list[dict]:
        return await self.pins()
