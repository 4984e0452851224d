"""The CRDT API from plain threads (BlockingNode.crdt), async watch, size limit, compaction."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from lattice import Node, NodeConfig
from lattice.blocking import BlockingDocument
from lattice.crdt import AccessDenied, Document, DocumentFull, UpdateLog, log_path
from lattice.identity import KeyPair


def _config(tmp_path, name, **kw):
    return NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / name, control=False, **kw)


def _until(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.fixture
def pair(tmp_path):
    a = Node.start(_config(tmp_path, "a"))
    b = Node.start(_config(tmp_path, "b"))
    try:
        b.connect(a.addrs[0])
        yield a, b
    finally:
        b.close()
        a.close()


def test_blocking_documents_replicate_with_the_same_names(pair):
    a, b = pair
    doc_a, doc_b = a.crdt.open("swarm/config"), b.crdt.open("swarm/config")
    assert isinstance(doc_a, BlockingDocument) and a.crdt.names == ["swarm/config"]
    seen = []
    unsubscribe = doc_b.observe(seen.append)  # called on its own thread, not the node's loop
    root = doc_a.get_map("root")
    root["lr"] = 0.05
    root["nested"] = {"a": [1, 2]}
    root.update({"x": 1, "y": 2})  # one signed update
    doc_a.get_array("log").extend(["one", "two"])
    text = doc_a.get_text("notes")
    text += "hello"
    text.insert(0, ">")
    assert doc_a.increment("progress", "steps", 100) == 100
    doc_a.transaction(lambda d: d.get_map("root").update({"t1": 1, "t2": 2}))
    assert root["lr"] == 0.05 and root.get("missing", 7) == 7 and "x" in root and len(root) == 6
    assert root["nested"] == {"a": [1.0, 2.0]}  # shared types come back as plain values
    _until(lambda: doc_b.get_map("root").to_py() == root.to_py())
    _until(lambda: doc_b.counter("progress", "steps") == 100 and str(doc_b.get_text("notes")) == ">hello")
    assert doc_b.get_array("log").to_py() == ["one", "two"] and doc_b.get_array("log")[1] == "two"
    _until(lambda: len(seen) == 8)  # 8 local transactions on a, each applied once on b
    assert all(c.author == a.peer_id and not c.local for c in seen)
    unsubscribe()
    root["after"] = 1
    _until(lambda: "after" in doc_b.get_map("root"))
    time.sleep(0.1)
    assert len(seen) == 8
    assert doc_a.version() == doc_b.version() and doc_b.stats.applied == 9


def test_many_threads_write_concurrently(pair):
    a, b = pair
    docs = [a.crdt.open("shared"), b.crdt.open("shared")]
    errors = []

    def writer(i: int) -> None:
        try:
            m = docs[i % 2].get_map("root")
            for j in range(50):
                m[f"t{i}-{j}"] = j
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    _until(lambda: all(len(d.get_map("root")) == 300 for d in docs))
    assert docs[0].get_map("root").to_py() == docs[1].get_map("root").to_py()


def test_refusals_raise_plainly_from_threads(pair):
    a, b = pair
    owned_a = a.crdt.open("owned", writers={a.peer_id}, max_bytes=2_000)
    owned_b = b.crdt.open("owned", writers={a.peer_id})
    with pytest.raises(AccessDenied):
        owned_b.get_map("root")["x"] = 1
    owned_a.get_map("root")["small"] = 1
    with pytest.raises(DocumentFull, match="over its limit of 2000 bytes"):
        owned_a.get_map("root")["big"] = "x" * 5_000
    assert owned_a.get_map("root").to_py() == {"small": 1.0}  # the refused write left nothing
    owned_a.get_map("root")["next"] = 2  # and the document keeps working
    _until(lambda: owned_b.get_map("root").to_py() == {"small": 1.0, "next": 2.0})


async def test_async_watch_yields_every_change(tmp_path):
    async with Node(_config(tmp_path, "a")) as node:
        doc = node.crdt.open("w")
        async with node.crdt.watch("w") as changes:
            for i in range(3):
                doc.get_map("root")[str(i)] = i
            with trio.fail_after(5):
                got = [await changes.receive() for _ in range(3)]
        assert [c.seq for c in got] == [1, 2, 3] and all(c.local for c in got)
        assert doc._observers == [doc._observers[0]]  # the watch unsubscribed (service's own stays)


def test_remote_updates_over_the_size_limit_are_rejected(tmp_path):
    writer = Document("lim", KeyPair.generate(), tmp_path / "w")
    for i in range(20):
        writer.get_map("root")[f"k{i}"] = "v" * 100
    small = Document("lim", KeyPair.generate(), tmp_path / "r", max_bytes=1_000, max_author_bytes=1_000)
    small.apply_many(writer.updates())
    assert 0 < small.size() <= 1_000 and small.stats.rejected_size > 0


def test_surplus_log_frames_are_compacted_when_the_service_opens_the_document(tmp_path):
    key = KeyPair.generate()
    crdt_dir = tmp_path / "a" / "crdt"
    doc = Document("c", key, crdt_dir)
    for i in range(40):
        doc.get_map("root")[str(i)] = i
    updates = doc.updates()
    doc.close()
    log = UpdateLog(log_path(crdt_dir, "c"))
    for _ in range(3):  # a log merged by hand: every frame four times
        for u in updates:
            log.append(u, sync=False)
    log.close()
    again = Document("c", key, crdt_dir)
    assert again.log_frames() == 160 and again.needs_compaction()
    again.close()
    node = Node.start(_config(tmp_path, "a"), keypair=key)
    try:
        doc = node.crdt.open("c")
        assert doc.run(lambda d: d.log_frames()) == 40  # compacted when the service opened it
        assert len(doc.get_map("root")) == 40
    finally:
        node.close()
    assert Document("c", key, crdt_dir).get_map("root").to_py() == {str(i): float(i) for i in range(40)}
