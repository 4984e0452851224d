"""What a writer can make a CRDT document hold (issue 16, defect 11): Yjs data checked also beyond a
sequence gap, bounded held (out-of-order) updates, per-author quotas, a clear DocumentFull, and a log
that cannot bring junk back after a restart."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lattice.crdt import Document, DocumentFull, SignedUpdate, UpdateLog, log_path, sign
from lattice.identity import KeyPair

NAME = "open/doc"


def keys(n: int) -> list[KeyPair]:
    return [KeyPair.from_seed(bytes([i + 40]) * 32) for i in range(n)]


def genuine(key: KeyPair, directory: Path, n: int, size: int = 8) -> list[SignedUpdate]:
    """``n`` real signed updates of ``key`` (seqs 1..n, one map key of ``size`` characters each)."""
    writer = Document(NAME, key, directory, writers={key.peer_id}, max_bytes=1 << 24)
    for i in range(n):
        writer.get_map("m")[f"{key.peer_id.short()}-{i}"] = "v" * size
    writer.close()
    return writer.updates()


def frames(directory: Path) -> list[SignedUpdate]:
    return list(UpdateLog(log_path(directory, NAME)).replay())


def test_gap_updates_with_junk_yjs_data_are_rejected_and_never_stored(tmp_path: Path) -> None:
    rogue, reader = keys(2)
    (first,) = genuine(rogue, tmp_path / "w", 1)
    doc = Document(NAME, reader, tmp_path / "r", max_bytes=200_000)
    assert doc.apply(first)
    junk = [sign(rogue, NAME, seq, os.urandom(4_000)) for seq in range(6, 106)]  # seq n+5 on: a gap
    assert doc.apply_many(junk) == 0
    assert doc.stats.rejected_malformed == 100 and doc.stats.invalid == 100
    assert doc.pending_count() == 0 and doc.size() == len(first.data)
    assert doc.missing_for({}) == [first]  # nothing of it is offered to other replicas
    doc.get_map("m")["mine"] = 1  # the document still takes writes
    doc.close()
    assert all(f.seq == 1 for f in frames(tmp_path / "r"))  # nor is it on disk


def test_held_updates_are_bounded_released_in_order_and_never_passed_on(tmp_path: Path) -> None:
    from lattice.crdt import DocLimits

    author, reader = keys(2)
    ups = genuine(author, tmp_path / "w", 60)
    doc = Document(NAME, reader, tmp_path / "r", limits=DocLimits(max_pending=10))
    seen: list[int] = []
    doc.observe(lambda change: seen.append(change.seq))
    assert doc.apply(ups[0])
    assert doc.apply_many(ups[2:]) == 0  # 58 beyond the gap at seq 2: 10 held, the rest dropped
    assert (doc.stats.held, doc.stats.dropped_pending, doc.pending_count()) == (10, 48, 10)
    assert doc.version() == {str(author.peer_id): 1} and doc.missing_for({}) == [ups[0]]
    assert doc.size() == len(ups[0].data) and seen == [1]  # held: not counted, not observed
    assert doc.apply(ups[1])  # the gap is filled: the held run follows, in order
    assert doc.version() == {str(author.peer_id): 12} and doc.pending_count() == 0
    assert seen == list(range(1, 13))
    doc.apply_many(ups[12:])  # what anti-entropy sends next (in order, from the version)
    assert doc.version() == {str(author.peer_id): 60} and len(doc.get_map("m").to_py()) == 60
    doc.close()
    assert [f.seq for f in frames(tmp_path / "r")] == list(range(1, 61))
    # the bytes are bounded too, per author and per document
    big = genuine(author, tmp_path / "w2", 20, size=2_000)
    limits = DocLimits(max_pending_bytes=10_000, max_pending_total=15_000)
    other = Document(NAME, reader, tmp_path / "r2", limits=limits)
    other.apply_many(big[1:])
    assert 0 < other.pending_bytes() <= 10_000 and other.stats.dropped_pending > 0
    more = genuine(keys(3)[2], tmp_path / "w3", 20, size=2_000)
    other.apply_many(more[1:])
    assert other.pending_bytes() <= 15_000


def test_a_legitimately_out_of_order_arrival_converges(tmp_path: Path) -> None:
    """Gossip may deliver n+1..n+3 before n: they wait (with the default limits) and apply once n
    arrives; nothing has to be fetched again."""
    author, reader = keys(2)
    ups = genuine(author, tmp_path / "w", 5)
    doc = Document(NAME, reader, tmp_path / "r")
    seen: list[int] = []
    doc.observe(lambda change: seen.append(change.seq))
    assert doc.apply(ups[0])
    assert all(doc.apply(u) for u in ups[2:])  # taken (held), not applied yet
    assert seen == [1] and doc.version() == {str(author.peer_id): 1}
    assert doc.apply(ups[1])
    assert seen == [1, 2, 3, 4, 5] and doc.version() == {str(author.peer_id): 5}
    assert len(doc.get_map("m").to_py()) == 5 and doc.pending_count() == 0
    assert doc.apply(ups[3]) is False and doc.stats.duplicates == 1


def test_one_author_cannot_fill_an_open_document(tmp_path: Path) -> None:
    flooder, honest, reader = keys(3)
    doc = Document(NAME, reader, tmp_path / "r", max_bytes=20_000)
    assert doc.max_author_bytes == 5_000  # default: a quarter of the document per author
    doc.apply_many(genuine(flooder, tmp_path / "f", 40, size=400))  # 16 KB of valid updates
    assert doc.stats.rejected_quota > 0 and doc.size() <= 5_000
    assert doc.apply_many(genuine(honest, tmp_path / "h", 5, size=400)) == 5  # others still get in
    doc.get_map("m")["local"] = "x"  # so does the local writer
    with pytest.raises(DocumentFull) as info, doc.transaction():  # within its own share only
        doc.get_map("m")["big"] = "y" * 6_000
    message = str(info.value)
    assert "\n" not in message and repr(NAME) in message and "per-author limit of 5000 bytes" in message
    assert "big" not in doc.get_map("m").to_py()
    # with a writer list each writer gets an equal share; one writer gets the whole document
    pair = {flooder.peer_id, honest.peer_id}
    assert Document("pair", reader, tmp_path / "p", writers=pair, max_bytes=20_000).max_author_bytes == 10_000
    solo = Document("solo", reader, tmp_path / "s", writers={reader.peer_id}, max_bytes=20_000)
    assert solo.max_author_bytes == 20_000


def test_junk_logged_by_an_older_version_is_dropped_when_the_document_opens(tmp_path: Path) -> None:
    """Older versions logged updates beyond a gap without checking them: 71 such updates made a
    document unwritable, also after a restart. Opening checks them and rewrites the log."""
    rogue, owner, other = keys(3)
    directory = tmp_path / "d"
    doc = Document(NAME, owner, directory, max_bytes=100_000)
    doc.get_map("m")["a"] = 1
    doc.close()
    held = genuine(other, tmp_path / "o", 3)[2]  # valid, but seq 3 of an author we hold nothing of
    log = UpdateLog(log_path(directory, NAME))
    for seq in range(6, 77):  # 71 junk updates of 4 KB: more than max_bytes
        log.append(sign(rogue, NAME, seq, os.urandom(4_000)), sync=False)
    log.append(held)
    log.close()
    again = Document(NAME, owner, directory, max_bytes=100_000)
    assert again.size() < 100 and again.pending_count() == 1  # the valid one waits for its gap
    again.get_map("m")["b"] = 2  # writable
    again.close()
    assert {f.author for f in frames(directory)} == {owner.peer_id}  # junk and held: off the disk
    assert Document(NAME, owner, directory).get_map("m").to_py() == {"a": 1.0, "b": 2.0}


def _var(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _one_item(content: bytes) -> bytes:
    """An update of one client with one Any item under root type "r", then an empty delete set."""
    item = bytes([8]) + _var(1) + _var(1) + b"r" + content
    return _var(1) + _var(1) + _var(5) + _var(0) + item + _var(0)


CRAFTED = {
    # yrs reserves memory for declared counts before reading them, and recurses without a limit
    "2^27 clients in 8 bytes": _var(1 << 27) + bytes(4),
    "an Any array of 2^40 values": _one_item(_var(1) + bytes([117]) + _var(1 << 40)),
    "Any arrays nested 60,000 deep": _one_item(_var(1) + (bytes([117]) + _var(1)) * 60_000 + bytes([126])),
    "a string that is not UTF-8": _one_item(_var(1) + bytes([119]) + _var(2) + b"\xff\xfe"),
    "junk after a valid update": b"\x00\x00" + os.urandom(64),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_yjs_data_beyond_what_yrs_can_bound_is_refused_before_yrs_sees_it(tmp_path: Path, name: str) -> None:
    """The 60,000-deep one crashed the process (SIGSEGV in yrs) even as a contiguous update."""
    rogue, reader = keys(2)
    doc = Document(NAME, reader, tmp_path)
    assert doc.apply(sign(rogue, NAME, 1, CRAFTED[name])) is False
    assert doc.stats.rejected_malformed == 1 and doc.size() == 0


PEAK = """
import resource, sys
sys.path.insert(0, {src!r})
from lattice.crdt import Document, sign
from lattice.identity import KeyPair
doc = Document("open/doc", KeyPair.generate(), {dir!r})
update = sign(KeyPair.generate(), "open/doc", 1, bytes.fromhex({data!r}))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert doc.apply(update) is False
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_declared_counts_cost_no_memory(tmp_path: Path) -> None:
    """8 bytes declaring 2^27 clients made yrs reserve and touch ~280 MiB before it failed."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    code = PEAK.format(src=src, dir=str(tmp_path), data=CRAFTED["2^27 clients in 8 bytes"].hex())
    grown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert grown.returncode == 0, grown.stderr
    assert int(grown.stdout) < 32, f"peak RSS grew by {grown.stdout.strip()} MiB"


def test_every_update_pycrdt_writes_passes_the_yjs_bounds() -> None:
    from pycrdt import Array, Doc, Map, Text, merge_updates

    from lattice.crdt.yjs import check_update

    doc: Doc = Doc()
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(bytes(event.update)))
    doc["m"], doc["a"], doc["t"] = Map(), Array(), Text()
    values = [1, -(2**40), 1.5, True, None, "é✓𝄞", b"\x00\xff", [1, [2, {"x": [3]}]], {"n": {"m": 1}}]
    for i, value in enumerate(values):
        with doc.transaction():
            doc["m"][f"k{i}"] = value
            doc["a"].append(value)
            doc["t"].insert(0, "ab𝄞", {"bold": True})
        doc["t"].insert_embed(0, {"image": "x.png"})
        doc["m"][f"nested{i}"] = Map({"arr": Array([1, Map({"z": "q"})]), "text": Text("hi")})
        doc["m"][f"sub{i}"] = Doc()
        with doc.transaction():  # created and deleted in one transaction
            doc["a"].insert(0, "x")
            del doc["a"][0]
        del doc["t"][0:2]
    for update in [*updates, doc.get_update(), merge_updates(*updates)]:
        check_update(update)
