"""``BlockingNode.crdt``: the CRDT service for plain threads, with the same names.

A :class:`Document` and its pycrdt shared types live on the node's trio thread and are not
thread-safe, so the blocking side never holds them: every read or write of a proxy below runs on
the node's loop (one round trip to the loop per call) and returns plain Python values. Use
:meth:`BlockingDocument.transaction` to group several writes into one signed update, and
:meth:`BlockingDocument.run` for anything else (the function runs on the loop thread).

Observers registered from the blocking side run on their own thread (one per subscription), so a
slow callback never stalls the node; up to ``MAX_PENDING`` changes wait for it, later ones are
dropped and counted (the document itself is always current: re-read it).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from pycrdt import Array, Map, Text

from lattice.identity import PeerId

from .document import MAX_DOC_BYTES, Change, DocStats, Document

log = logging.getLogger(__name__)

MAX_PENDING = 10_000


def _plain(value: Any) -> Any:
    """Shared types never cross to the blocking thread: they become plain values."""
    return value.to_py() if isinstance(value, Map | Array | Text) else value


class BlockingCRDT:
    """``node.crdt`` for blocking code: ``node.crdt.open("swarm/config")`` -> :class:`BlockingDocument`."""

    def __init__(self, owner: Any, service: Any) -> None:
        self._owner = owner  # a BlockingNode: its _call runs a coroutine function on the node's loop
        self._service = service

    def _sync(self, fn: Callable[[], Any]) -> Any:
        async def on_loop() -> Any:
            return fn()

        return self._owner._call(on_loop)

    def open(
        self,
        name: str,
        writers: set[PeerId] | None = None,
        max_bytes: int = MAX_DOC_BYTES,
        max_author_bytes: int | None = None,
    ) -> BlockingDocument:
        self._sync(lambda: self._service.open(name, writers, max_bytes, max_author_bytes))
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
        return self.run(lambda d: DocStats(**vars(d.stats)))

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


__all__ = ["BlockingArray", "BlockingCRDT", "BlockingDocument", "BlockingMap", "BlockingText"]
