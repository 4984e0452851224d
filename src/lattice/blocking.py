"""The blocking facades: a node and its services for plain threads (training scripts, notebooks),
with the async API's names (httpx's pattern: one async API, a sync facade over it).

``Node.start()`` runs a node on a background thread and returns its :class:`BlockingNode`; every
call of a facade below runs the async method on the node's trio loop and waits for its result.

The CRDT facade (``BlockingNode.crdt``): a :class:`Document` and its pycrdt shared types live on the
node's trio thread and are not thread-safe, so the blocking side never holds them: every read or
write of a proxy below runs on the node's loop (one round trip to the loop per call) and returns
plain Python values. Use :meth:`BlockingDocument.transaction` to group several writes into one
signed update, and :meth:`BlockingDocument.run` for anything else (the function runs on the loop
thread). Observers registered from the blocking side run on their own thread (one per
subscription), so a slow callback never stalls the node; up to ``MAX_PENDING`` changes wait for
it, later ones are dropped and counted (the document itself is always current: re-read it).

This module wraps the node (it is in the node layer) but does not import ``lattice.node``: the node
imports it to build its facade, and what a facade needs of the node is :class:`AsyncNode`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import trio

from lattice.errors import NodeError
from lattice.identity import PeerId

if TYPE_CHECKING:  # services' types (imported lazily at run time: a node without them pays nothing)
    from pycrdt import Array, Map, Text

    from lattice.content.service import Content
    from lattice.crdt.document import Change, DocStats, Document
    from lattice.crdt.service import CRDT
    from lattice.dht.service import DHT
    from lattice.rpc.service import RPC

__all__ = [
    "AsyncNode",
    "BlockingArray",
    "BlockingCRDT",
    "BlockingDocument",
    "BlockingMap",
    "BlockingNode",
    "BlockingRPC",
    "BlockingService",
    "BlockingText",
]

log = logging.getLogger(__name__)

MAX_PENDING = 10_000  # changes waiting for a blocking observer before later ones are dropped


class AsyncNode(Protocol):
    """What the facade needs of a node (``lattice.node.Node``)."""

    async def __aenter__(self) -> Any: ...
    async def __aexit__(self, *exc_info: Any) -> bool: ...
    @property
    def peer_id(self) -> PeerId: ...
    @property
    def addrs(self) -> list[str]: ...
    @property
    def rpc(self) -> RPC: ...
    @property
    def dht(self) -> DHT: ...
    @property
    def crdt(self) -> CRDT: ...
    @property
    def content(self) -> Content: ...
    async def id(self) -> dict: ...
    async def connect(self, addr: str | PeerId, timeout: float | None = None) -> str: ...
    async def disconnect(self, peer: str | PeerId) -> None: ...
    async def ping(
        self, target: str | PeerId, count: int = 1, timeout: float | None = None
    ) -> list[float]: ...
    async def peers(self) -> list[dict]: ...
    async def status(self) -> dict: ...


class BlockingNode:
    """The same node and method names, blocking: for training scripts and notebooks."""

    def __init__(self, node: AsyncNode, start_timeout: float = 30.0) -> None:
        self.node = node
        self._token: trio.lowlevel.TrioToken | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="lattice-node", daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout):
            raise NodeError(f"node did not start within {start_timeout:.0f}s")
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        async def run() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            try:
                async with self.node:
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as exc:  # surfaced to the caller of start()
                self._error = exc
                self._ready.set()

        trio.run(run)

    def run(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """Run any coroutine function on the node's trio loop and wait for its result (every
        facade's calls go through here)."""
        if self._token is None or not self._thread.is_alive():
            raise NodeError("the node is closed")
        return trio.from_thread.run(functools.partial(fn, *args, **kwargs), trio_token=self._token)

    @property
    def peer_id(self) -> PeerId:
        return self.node.peer_id

    @property
    def dht(self) -> BlockingService:
        """The DHT, blocking (same method names as ``Node.dht``)."""
        return BlockingService(self, self.node.dht, ("put", "get", "provide", "find_providers"))

    @property
    def crdt(self) -> BlockingCRDT:
        """Replicated documents, blocking (``node.crdt.open("swarm/config").get_map("root")["lr"] = 0.1``;
        reads and writes run on the node's loop, values come back as plain Python)."""
        return BlockingCRDT(self, self.node.crdt)

    @property
    def content(self) -> BlockingService:
        """Content-addressed blobs and checkpoints, blocking (same names as ``Node.content``:
        ``cid = node.content.add("model.safetensors")``, ``node.content.get(cid, "out")``); a ``get``'s
        ``on_progress`` callback runs on the node's thread."""
        names = ("add", "get", "get_tensors", "pin", "unpin", "pins", "gc", "status", "verify")
        return BlockingService(self, self.node.content, names)

    @property
    def rpc(self) -> BlockingRPC:
        """The RPC service, blocking (same method names as ``Node.rpc``)."""
        return BlockingRPC(self, self.node.rpc)

    @property
    def addrs(self) -> list[str]:
        return self.run(_sync_to_async(lambda: self.node.addrs))

    def id(self) -> dict:
        return self.run(self.node.id)

    def connect(self, addr: str, timeout: float | None = None) -> str:
        return self.run(self.node.connect, addr, timeout)

    def disconnect(self, peer: str | PeerId) -> None:
        return self.run(self.node.disconnect, peer)

    def ping(self, target: str | PeerId, count: int = 1, timeout: float | None = None) -> list[float]:
        return self.run(self.node.ping, target, count, timeout)

    def peers(self) -> list[dict]:
        return self.run(self.node.peers)

    def status(self) -> dict:
        return self.run(self.node.status)

    def close(self) -> None:
        """Stop the node and its thread (idempotent)."""
        if self._token is not None and self._thread.is_alive() and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout=10)

    def __enter__(self) -> BlockingNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sync_to_async(fn: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    async def wrapper() -> Any:
        return fn()

    return wrapper


class BlockingRPC:
    """``node.rpc`` for blocking code: calls block; plain (sync) handlers run in worker threads."""

    def __init__(self, owner: BlockingNode, rpc: RPC) -> None:
        self._owner = owner
        self._rpc = rpc

    def register(self, name: str, fn: Callable[..., Any], **kwargs: Any) -> None:
        self._rpc.register(name, fn, **kwargs)

    def method(self, name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return self._rpc.method(name, **kwargs)

    @property
    def methods(self) -> list[str]:
        return self._rpc.methods

    def call(self, peer: Any, method: str, payload: Any = None, **kwargs: Any) -> Any:
        return self._owner.run(self._rpc.call, peer, method, payload, **kwargs)

    def call_client_stream(self, peer: Any, method: str, values: Any, **kwargs: Any) -> Any:
        return self._owner.run(self._rpc.call_client_stream, peer, method, list(values), **kwargs)

    def call_stream(self, peer: Any, method: str, payload: Any = None, **kwargs: Any) -> list[Any]:
        """All values of a server-streaming call (use the async API to consume them one by one)."""

        async def collect() -> list[Any]:
            async with self._rpc.call_stream(peer, method, payload, **kwargs) as items:
                return [item async for item in items]

        return self._owner.run(collect)


class BlockingService:
    """A service's async methods as blocking calls on the node's loop (same names)."""

    def __init__(self, owner: BlockingNode, service: Any, names: tuple[str, ...]) -> None:
        self._owner = owner
        self._service = service
        self._names = names

    def __getattr__(self, name: str) -> Any:
        if name not in self._names:
            raise AttributeError(name)
        method = getattr(self._service, name)
        return lambda *args, **kwargs: self._owner.run(method, *args, **kwargs)


def _plain(value: Any) -> Any:
    """Shared types never cross to the blocking thread: they become plain values."""
    from pycrdt import Array, Map, Text

    return value.to_py() if isinstance(value, Map | Array | Text) else value


class BlockingCRDT:
    """``node.crdt`` for blocking code: ``node.crdt.open("swarm/config")`` -> :class:`BlockingDocument`."""

    def __init__(self, owner: BlockingNode, service: CRDT) -> None:
        self._owner = owner
        self._service = service

    def _sync(self, fn: Callable[[], Any]) -> Any:
        async def on_loop() -> Any:
            return fn()

        return self._owner.run(on_loop)

    def open(
        self,
        name: str,
        writers: set[PeerId] | None = None,
        max_bytes: int | None = None,
        max_author_bytes: int | None = None,
    ) -> BlockingDocument:
        """As ``CRDT.open`` (``max_bytes`` None: its default)."""
        service = self._service
        if max_bytes is None:
            self._sync(lambda: service.open(name, writers, max_author_bytes=max_author_bytes))
        else:
            self._sync(lambda: service.open(name, writers, max_bytes, max_author_bytes))
        return BlockingDocument(self, name)

    @property
    def names(self) -> list[str]:
        """The open documents."""
        return self._sync(lambda: sorted(self._service.docs))


class BlockingDocument:
    """A proxy for one open document: same method names as :class:`Document`, plain values."""

    def __init__(self, crdt: BlockingCRDT, name: str) -> None:
        self._crdt = crdt
        self.name = name
        self.dropped_changes = 0  # changes a slow blocking observer never saw (queue full)

    def run(self, fn: Callable[[Document], Any]) -> Any:
        """``fn(document)`` on the node's loop thread; its result must not be a shared type."""
        service = self._crdt._service
        return self._crdt._sync(lambda: _plain(fn(service.open(self.name))))

    def transaction(self, fn: Callable[[Document], Any]) -> Any:
        """``fn(document)`` inside one transaction: its writes become one signed, durable update."""

        def body(doc: Document) -> Any:
            with doc.transaction():
                return fn(doc)

        return self.run(body)

    def get_map(self, name: str) -> BlockingMap:
        return BlockingMap(self, name)

    def get_array(self, name: str) -> BlockingArray:
        return BlockingArray(self, name)

    def get_text(self, name: str) -> BlockingText:
        return BlockingText(self, name)

    def increment(self, map_name: str, key: str, delta: int = 1) -> int:
        return self.run(lambda d: d.increment(map_name, key, delta))

    def counter(self, map_name: str, key: str) -> int:
        return self.run(lambda d: d.counter(map_name, key))

    def version(self) -> dict[str, int]:
        return self.run(lambda d: d.version())

    def size(self) -> int:
        return self.run(lambda d: d.size())

    @property
    def stats(self) -> DocStats:
        return self.run(lambda d: dataclasses.replace(d.stats))

    def observe(self, callback: Callable[[Change], None]) -> Callable[[], None]:
        """Call ``callback(change)`` on a dedicated thread after every applied update; returns an
        unsubscribe function (it stops the thread)."""
        pending: queue.Queue[Change] = queue.Queue(MAX_PENDING)
        stopped = threading.Event()

        def on_change(change: Change) -> None:  # on the loop thread: never blocks
            try:
                pending.put_nowait(change)
            except queue.Full:
                self.dropped_changes += 1

        def deliver() -> None:
            while not stopped.is_set():
                try:
                    change = pending.get(timeout=0.5)
                except queue.Empty:
                    continue
                try:
                    callback(change)
                except Exception:  # a callback's bug must not end the subscription
                    log.exception("CRDT observer failed on %s", self.name)

        unsubscribe_on_loop = self.run(lambda d: d.observe(on_change))
        thread = threading.Thread(target=deliver, name=f"crdt-observe-{self.name}", daemon=True)
        thread.start()

        def unsubscribe() -> None:
            try:
                self._crdt._sync(unsubscribe_on_loop)
            finally:
                stopped.set()
                if thread is not threading.current_thread():
                    thread.join(timeout=5)

        return unsubscribe

    def __repr__(self) -> str:
        return f"BlockingDocument({self.name!r})"


class _Shared:
    def __init__(self, doc: BlockingDocument, name: str) -> None:
        self._doc = doc
        self.name = name

    def _shared(self, doc: Document) -> Any:
        raise NotImplementedError

    def _on(self, fn: Callable[[Any], Any]) -> Any:
        return self._doc.run(lambda d: fn(self._shared(d)))

    def _write(self, fn: Callable[[Any], Any]) -> Any:
        """A write as one transaction: a refusal (AccessDenied, DocumentFull) raises as itself."""
        return self._doc.transaction(lambda d: fn(self._shared(d)))

    def to_py(self) -> Any:
        return self._on(lambda s: s.to_py())

    def __len__(self) -> int:
        return self._on(len)


class BlockingMap(_Shared):
    """A document's map, read and written through the node's loop (values come back plain)."""

    def _shared(self, doc: Document) -> Map:
        return doc.get_map(self.name)

    def to_py(self) -> dict:
        return self._on(lambda m: dict(m.to_py() or {}))

    def __getitem__(self, key: str) -> Any:
        return self._on(lambda m: _plain(m[key]))

    def get(self, key: str, default: Any = None) -> Any:
        return self._on(lambda m: _plain(m.get(key, default)))

    def __setitem__(self, key: str, value: Any) -> None:
        self._write(lambda m: m.__setitem__(key, value))

    def __delitem__(self, key: str) -> None:
        self._write(lambda m: m.__delitem__(key))

    def __contains__(self, key: object) -> bool:
        return self._on(lambda m: key in m)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def keys(self) -> list[str]:
        return self._on(lambda m: list(m.keys()))

    def items(self) -> list[tuple[str, Any]]:
        return list(self.to_py().items())

    def values(self) -> list[Any]:
        return list(self.to_py().values())

    def update(self, values: dict[str, Any]) -> None:
        """Set several keys in one signed update."""

        def body(m: Map) -> None:
            for key, value in values.items():
                m[key] = value

        self._write(body)

    def pop(self, key: str, *default: Any) -> Any:
        return self._write(lambda m: _plain(m.pop(key, *default)))


class BlockingArray(_Shared):
    """A document's array through the node's loop."""

    def _shared(self, doc: Document) -> Array:
        return doc.get_array(self.name)

    def to_py(self) -> list:
        return list(self._on(lambda a: a.to_py() or []))

    def __getitem__(self, index: int | slice) -> Any:
        return self._on(
            lambda a: [_plain(v) for v in a[index]] if isinstance(index, slice) else _plain(a[index])
        )

    def append(self, value: Any) -> None:
        self._write(lambda a: a.append(value))

    def extend(self, values: list[Any]) -> None:
        self._write(lambda a: a.extend(list(values)))

    def insert(self, index: int, value: Any) -> None:
        self._write(lambda a: a.insert(index, value))

    def __delitem__(self, index: int | slice) -> None:
        self._write(lambda a: a.__delitem__(index))


class BlockingText(_Shared):
    """A document's text through the node's loop."""

    def _shared(self, doc: Document) -> Text:
        return doc.get_text(self.name)

    def __str__(self) -> str:
        return self._on(str)

    def to_py(self) -> str:
        return self._on(str)

    def insert(self, index: int, value: str) -> None:
        self._write(lambda t: t.insert(index, value))

    def __iadd__(self, value: str) -> BlockingText:
        self._write(lambda t: t.__iadd__(value))
        return self

    def __delitem__(self, index: int | slice) -> None:
        self._write(lambda t: t.__delitem__(index))
