"""A stranger floods a document anyone may write with updates beyond a sequence gap (issue 16, defect
11), against two real daemons: junk is rejected and neither stored nor replicated, the flooder is
banned, held updates stay bounded, one author cannot fill the document, and honest writers keep
writing on both replicas, also after a restart."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import trio
from pycrdt import Doc

from attacks.crdt_gap import crdt_gap_flood
from lattice.control.client import RemoteError
from lattice.crdt import UpdateLog, log_path
from lattice.testing.daemons import Daemon, start_daemon, wait_for

LOOPBACK = ["--listen", "/ip4/127.0.0.1/tcp/0"]
DOC = "open"
MAX_BYTES = 1 << 20  # the unfixed node was full after 64 junk updates of 16 KiB
QUOTA = MAX_BYTES // 4  # the default fair share of one author


def open_docs(*daemons: Daemon) -> None:
    for d in daemons:
        d.call("crdt.open", doc=DOC, max_bytes=MAX_BYTES)


def has(daemon: Daemon, **expected: object) -> bool:
    got = daemon.call("crdt.get", doc=DOC)
    return all(got.get(k) == v for k, v in expected.items())


def logged(home: Path) -> list:
    """The document's log on disk (read while the daemon is stopped)."""
    return list(UpdateLog(log_path(home / "crdt", DOC)).replay())


def test_a_gap_flood_leaves_the_document_writable_on_every_replica(tmp_path: Path) -> None:
    a = start_daemon(tmp_path, "a", LOOPBACK)
    b_args = [*LOOPBACK, "--bootstrap", a.info["addrs"][0]]
    b = start_daemon(tmp_path, "b", b_args)
    try:
        open_docs(a, b)
        wait_for(lambda: b.call("peers"), 10, "connection")
        a.call("crdt.set", doc=DOC, key="hello", value="world")
        wait_for(lambda: has(b, hello="world"), 10, "replication")

        flood = functools.partial(crdt_gap_flood, b.info["addrs"][0], DOC, junk=128, junk_size=16 * 1024,
                                  held=1100, quota_updates=40, quota_size=8 * 1024)  # fmt: skip
        result = trio.run(flood)
        assert result["junk_sent"] >= 100 and result["held_sent"] == 1100, result

        # honest writers on both replicas are served, and see each other's writes
        b.call("crdt.set", doc=DOC, key="from-b", value=1)
        a.call("crdt.set", doc=DOC, key="from-a", value=2)
        for d in (a, b):
            wait_for(lambda d=d: has(d, **{"from-a": 2, "from-b": 1}), 15, "honest replication")

        service = b.call("crdt.status")
        assert service["invalid"] >= 100 and service["held"] >= 1024, service  # also in /metrics
        status = service["docs"][DOC]
        assert status["rejected_malformed"] >= 100, status  # every junk update, gap or not
        assert status["rejected_quota"] > 0 and status["dropped_pending"] > 0, status
        assert status["pending"] <= 1024 and status["bytes"] <= QUOTA + 4096, status
        assert status["version"].get(result["held_author"]) == 1  # held ones are not applied ...
        status_a = a.call("crdt.status")["docs"][DOC]
        assert status_a["rejected_malformed"] == 0 and status_a["pending"] == 0, status_a  # ... nor sent on
        assert status_a["version"].get(result["held_author"], 1) == 1, status_a

        bans = b.call("limits.bans")
        banned = set(result["junk_authors"]) & set(bans["ban_reasons"])
        assert banned and result["junk_identities"] > 1, (result, bans)  # penalized, banned, came back
        assert all("CRDT updates" in bans["ban_reasons"][p] for p in banned), bans

        # a full document answers with one clear line (it used to be an ExceptionGroup)
        b.call("crdt.open", doc="tiny", max_bytes=300)
        with pytest.raises(RemoteError) as info:
            b.call("crdt.set", doc="tiny", key="k", value="x" * 1000)
        assert info.value.type == "DocumentFull" and "\n" not in str(info.value)
        assert "'tiny' is full" in str(info.value) and "limit of 300 bytes" in str(info.value)

        # after a restart the junk is not back: the log holds applied, valid, contiguous updates only
        size = status["bytes"]
        b.stop()
        frames = logged(tmp_path / "b")
        junk_authors = set(result["junk_authors"])
        assert all(f.seq == 1 for f in frames if str(f.author) in junk_authors)  # their valid seq 1 only
        by_author: dict = {}
        for f in frames:
            Doc().apply_update(f.data)  # every frame is a usable Yjs update
            by_author.setdefault(f.author, []).append(f.seq)
        assert all(sorted(seqs) == list(range(1, len(seqs) + 1)) for seqs in by_author.values())
        b = start_daemon(tmp_path, "b", b_args)
        open_docs(b)
        assert b.call("crdt.status")["docs"][DOC]["bytes"] <= size + 4096
        b.call("crdt.set", doc=DOC, key="after-restart", value=3)
        wait_for(lambda: has(a, **{"after-restart": 3}), 15, "replication after restart")
    finally:
        b.stop()
        a.stop()
