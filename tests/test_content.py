"""lattice.content without the network: content ids, manifests, the scheduler and the local store."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lattice.content.cid import BLAKE3, DAG_JSON, RAW, SHA2_256, ContentId
from lattice.content.errors import ContentError, IntegrityError, PayloadError, StoreFull
from lattice.content.manifest import Manifest, safetensors_layout
from lattice.content.schedule import DUPLICATE, NEEDED, UNEXPECTED, Scheduler
from lattice.content.store import Store

MiB = 1 << 20
CHUNK = 64 << 10


# -- content ids
def test_cid_known_answer_and_round_trip():
    # the CIDv1 of the raw block "hello world" (sha2-256), as IPFS spells it
    cid = ContentId.of(b"hello world", RAW, SHA2_256)
    assert str(cid) == "bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e"
    assert ContentId.parse(str(cid)) == cid and cid.matches(b"hello world") and not cid.matches(b"hello")
    # BLAKE3 of the empty string (the reference digest), as a multihash with code 0x1e
    empty = ContentId.of(b"", RAW, BLAKE3)
    assert empty.digest.hex() == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert empty.to_bytes()[:4] == bytes([1, 0x55, 0x1E, 0x20]) and str(empty).startswith("bafkr4i")
    manifest_id = ContentId.of(b"{}", DAG_JSON, BLAKE3)
    assert str(manifest_id).startswith("baguqeh") and ContentId.parse(str(manifest_id)) == manifest_id


@pytest.mark.parametrize(
    "text",
    [
        "",
        "b",
        "Qmfoo",
        "zabc",
        "b" + "a" * 200,
        "b!!!!",
        "bafyreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5",
    ],
)
def test_cid_parse_rejects_garbage_with_one_line(text):
    with pytest.raises(ContentError) as info:
        ContentId.parse(text)
    assert "\n" not in str(info.value)


def test_cid_parse_rejects_wrong_version_codec_and_lengths():
    good = ContentId.of(b"x", RAW, SHA2_256).to_bytes()
    for raw in (
        b"\x02" + good[1:],
        good[:1] + b"\x70" + good[2:],
        good[:-1],
        good + b"\0",
        good[:3] + b"\x10" + good[4:],
    ):
        with pytest.raises(ContentError):
            ContentId.from_bytes(raw)


# -- manifests
def _manifest(size=3 * CHUNK + 5) -> tuple[Manifest, bytes]:
    data = os.urandom(size)
    chunks = tuple(ContentId.of(data[i : i + CHUNK], RAW, BLAKE3).digest for i in range(0, size, CHUNK))
    return Manifest(size, CHUNK, BLAKE3, chunks), data


def test_manifest_is_sorted_compact_dag_json_and_round_trips():
    m, _ = _manifest()
    raw = m.encode()
    doc = json.loads(raw)
    assert raw == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert doc["chunks"][0]["/"].startswith("bafkr4i") and doc["size"] == m.size
    assert Manifest.decode(raw, 1 << 20) == m
    assert m.cid.codec == DAG_JSON and m.cid.matches(raw)
    assert m.chunk_range(3) == (3 * CHUNK, 3 * CHUNK + 5)


def _doc(m: Manifest) -> dict:
    return json.loads(m.encode())


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(size=d["size"] + 2 * CHUNK),  # chunk count does not match the size
        lambda d: d.update(chunk_size=1),
        lambda d: d.update(chunk_size=1 << 30),
        lambda d: d.update(format="other"),
        lambda d: d.update(kind="exe"),
        lambda d: d["chunks"].__setitem__(
            0, {"/": "bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e"}
        ),
        lambda d: d["chunks"].__setitem__(0, "notalink"),
        lambda d: d.update(size=-1),
        lambda d: d.update(size=True),
        lambda d: d.update(tensors=[]),  # a blob with tensors
    ],
)
def test_manifest_decode_rejects_inconsistent_documents(mutate):
    m, _ = _manifest()
    doc = _doc(m)
    mutate(doc)
    with pytest.raises(PayloadError) as info:
        Manifest.decode(json.dumps(doc).encode(), 1 << 20)
    assert "\n" not in str(info.value)


def test_manifest_decode_bounds_size_and_nesting_before_parsing():
    with pytest.raises(PayloadError, match="over the limit"):
        Manifest.decode(b" " * 2048, 1024)
    with pytest.raises(PayloadError, match="malformed"):
        Manifest.decode(b"[" * 100_000 + b"]" * 100_000, 1 << 20)
    with pytest.raises(PayloadError):
        Manifest.decode(b"\xff\xfe", 1024)


def test_tensor_offsets_must_match_dtype_and_shape():
    m, _ = _manifest()
    doc = _doc(m)
    doc["kind"] = "safetensors"
    doc["tensors"] = [{"dtype": "F32", "name": "w", "offsets": [8, 8 + 16], "shape": [2, 2]}]
    assert Manifest.decode(json.dumps(doc).encode(), 1 << 20).tensors[0].shape == (2, 2)
    for bad in ([8, 8 + 15], [m.size, m.size + 16], [16, 8]):
        doc["tensors"][0]["offsets"] = bad
        with pytest.raises(PayloadError):
            Manifest.decode(json.dumps(doc).encode(), 1 << 20)


def test_safetensors_layout_gives_absolute_offsets_and_chunks_for(tmp_path):
    from safetensors.numpy import save_file

    tensors = {"a": np.arange(10, dtype=np.float32), "b": np.ones((300, 100), np.float16)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    raw = path.read_bytes()
    layout = {t.name: t for t in safetensors_layout(raw, len(raw))}
    for name, arr in tensors.items():
        entry = layout[name]
        assert raw[entry.start : entry.end] == arr.tobytes()
    with pytest.raises(PayloadError):
        safetensors_layout(b"\xff" * 16, 16)


# -- the scheduler
def test_scheduler_pulls_lowest_first_and_faster_providers_get_bigger_batches():
    s = Scheduler(range(40), lambda i: CHUNK, CHUNK, max_batch=8, first_batch=2, target_seconds=1.0)
    rid_a, a = s.request("a", 0.0)
    rid_b, b = s.request("b", 0.0)
    assert a == [0, 1] and b == [2, 3]
    for i in a:  # a delivers 64 KiB in 10 ms: 6.4 MB/s -> a batch of 8 next
        assert s.arrived(rid_a, i) == NEEDED
        s.completed(rid_a, i, 0.01 * (i + 1))
    for i in b:  # b takes a second per chunk -> batches of 1
        assert s.arrived(rid_b, i) == NEEDED
        s.completed(rid_b, i, 1.0 * (i - 1))
    s.finish(rid_a)
    s.finish(rid_b)
    assert len(s.request("a", 2.1)[1]) == 8
    assert len(s.request("b", 2.1)[1]) == 1


def test_a_slow_providers_rate_is_measured_by_arrivals_when_chunks_are_written_in_batches():
    """Chunks are written a batch at a time: counted at the write's time, a slow provider's 4 chunks
    looked delivered at once (10 GB/s) and it was asked for the biggest batches."""
    s = Scheduler(range(40), lambda i: CHUNK, CHUNK, max_batch=8, first_batch=4, target_seconds=1.0)
    rid, chunks = s.request("slow", 0.0)
    arrivals = [1.0, 2.0, 3.0, 4.0]  # a chunk a second, all written together at 4.0
    for i in chunks:
        assert s.arrived(rid, i) == NEEDED
    for i, at in zip(reversed(chunks), reversed(arrivals), strict=True):  # and out of order
        s.completed(rid, i, at)
    s.finish(rid)
    assert s.providers["slow"].rate < 2 * CHUNK
    assert len(s.request("slow", 4.1)[1]) == 1


def test_scheduler_endgame_races_inflight_chunks_and_cancels_losers():
    s = Scheduler(
        range(3), lambda i: CHUNK, CHUNK, max_batch=4, first_batch=4, endgame_copies=2, endgame_batch=4
    )
    rid_slow, asked = s.request("slow", 0.0)
    assert asked == [0, 1, 2]
    rid_fast, raced = s.request("fast", 0.1)  # nothing pending: race what slow holds, its last first
    assert raced == [2, 1, 0]
    assert s.request("third", 0.1) is None  # at most two copies of a chunk
    for i in (2, 1, 0):
        assert s.arrived(rid_fast, i) == NEEDED
        cancel = s.completed(rid_fast, i, 0.2)
    assert cancel == [rid_slow] and s.complete
    assert s.arrived(rid_slow, 0) == DUPLICATE  # asked, but another copy won
    assert s.arrived(rid_slow, 0) == UNEXPECTED  # twice
    assert s.finish(rid_slow) == []


def test_scheduler_endgame_races_a_few_chunks_from_the_tail():
    s = Scheduler(range(32), lambda i: CHUNK, CHUNK, max_batch=16, first_batch=16)
    _, a = s.request("a", 0.0)
    _, b = s.request("b", 0.0)
    assert a == list(range(16)) and b == list(range(16, 32))
    assert s.request("c", 0.1)[1] == [31, 15]  # the last of each, two at a time
    assert s.request("c", 0.1)[1] == [30, 14]


def test_the_endgame_races_only_chunks_a_provider_would_bring_sooner_than_their_holders():
    """A copy that loses the race wastes the fetcher's downlink: once rates are known, a fast idle
    provider races a slow holder's chunks, not those a fast holder is about to deliver."""
    s = Scheduler(
        range(12), lambda i: CHUNK, CHUNK, max_batch=8, first_batch=2, target_seconds=1.0, endgame_batch=4
    )
    rates = {"fast": 0.01, "slow": 1.0, "other": 0.01}  # seconds per chunk
    for peer, per_chunk in rates.items():  # one measured chunk each
        rid, (first, *_others) = s.request(peer, 0.0)
        s.arrived(rid, first)
        s.completed(rid, first, per_chunk)
        s.finish(rid)  # its other chunk goes back to the pool
    _, slow = s.request("slow", 1.0)  # 1 chunk (a second of it)
    _, other = s.request("other", 1.0)  # the other 8: 10 ms each
    assert len(slow) == 1 and len(other) == 8
    _, raced = s.request("fast", 1.0)  # nothing pending: the endgame, latest due first
    assert raced == [slow[0], other[7], other[6], other[5]]
    _, raced = s.request("fast", 1.0)
    assert raced == [other[4], other[3], other[2], other[1]]
    assert s.request("fast", 1.0) is None  # other's next chunk comes in 10 ms: no copy wasted on it
    assert s.request("fast", 1.05)[1] == [other[0]]  # but other went silent for 50 ms: raced


def test_scheduler_duplicates_lacks_and_failures():
    s = Scheduler(range(2), lambda i: CHUNK, CHUNK, first_batch=2, max_failures=2)
    rid, _ = s.request("a", 0.0)
    assert s.arrived(rid, 5) == UNEXPECTED
    assert s.arrived(rid, 0) == NEEDED
    s.lacks(rid, 0)  # a does not have chunk 0: it goes back to the pool, never to a again
    assert s.arrived(rid, 1) == NEEDED
    s.completed(rid, 1, 0.1)
    s.finish(rid)
    assert s.request("a", 0.2) is None and s.stuck() == [0]
    rid_b, asked = s.request("b", 0.2)
    assert asked == [0] and s.stuck() == []
    assert not s.failed("b") and s.failed("b")  # dropped after two failures in a row
    s.finish(rid_b)
    assert s.request("b", 0.3) is None and s.stuck() == [0]
    s2 = Scheduler([0], lambda i: CHUNK, CHUNK, endgame_copies=2)
    r1, _ = s2.request("a", 0)
    r2, _ = s2.request("b", 0)
    assert s2.arrived(r1, 0) == NEEDED
    s2.completed(r1, 0, 0.1)
    assert s2.arrived(r2, 0) == DUPLICATE and s2.duplicates == 1


# -- the store
def _store(tmp_path, max_bytes=64 * MiB, **kw) -> Store:
    store = Store(tmp_path / "content", max_bytes, **kw)
    store.open()
    return store


def _blob(tmp_path, size, name="blob.bin") -> tuple:
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    return path, data


def _read_all(store: Store, cid) -> bytes:
    reader = store.reader(cid)
    buf = np.empty(reader.manifest.chunk_size, np.uint8)
    out = b"".join(bytes(reader.read(i, buf)) for i in range(reader.manifest.count))
    reader.close()
    return out


def test_store_add_read_and_reopen(tmp_path):
    path, data = _blob(tmp_path, 3 * CHUNK + 7)
    store = _store(tmp_path)
    cid = store.add_file(path, CHUNK)
    assert store.add_file(path, CHUNK) == cid  # same bytes, same id
    assert store.state(cid) == "complete" and store.data_path(cid).read_bytes() == data
    assert os.stat(store.data_path(cid)).st_mode & 0o777 == 0o444
    assert _read_all(store, cid) == data
    store.pin(cid)
    store.close()
    again = _store(tmp_path)
    assert again.state(cid) == "complete" and str(cid) in again.pinned and _read_all(again, cid) == data


def test_store_partial_resumes_and_reverifies_claimed_chunks(tmp_path):
    path, data = _blob(tmp_path, 4 * CHUNK)
    src = _store(tmp_path / "src")
    cid = src.add_file(path, CHUNK)
    raw = src.manifest_bytes(cid)
    dst = _store(tmp_path / "dst")
    with pytest.raises(IntegrityError):
        dst.begin(cid, raw + b" ")
    part = dst.begin(cid, raw)
    part.write(0, data[:CHUNK])
    part.write(2, data[2 * CHUNK : 3 * CHUNK])
    with pytest.raises(IntegrityError):
        part.write(1, data[:CHUNK])
    dst.release(part)
    dst.close()
    # a crash lost the write of chunk 2 (its "have" byte survived): reopening re-hashes claimed chunks
    with open(dst.partial_paths(cid)[0], "r+b") as f:
        f.seek(2 * CHUNK)
        f.write(bytes(CHUNK))
    dst = _store(tmp_path / "dst")
    part = dst.begin(cid, raw)
    assert part.missing() == [1, 2, 3] and dst.stats["corrupt_chunks"] == 1
    for i in part.missing():
        part.write(i, data[i * CHUNK : (i + 1) * CHUNK])
    dst.finish(part)
    assert dst.state(cid) == "complete" and dst.data_path(cid).read_bytes() == data
    assert not dst.partial_paths(cid)[1].exists()


@pytest.mark.parametrize("direct", [True, False])
def test_store_partial_writes_with_and_without_o_direct(tmp_path, direct):
    path, data = _blob(tmp_path, 5 * CHUNK + 1000)  # the last chunk: whole blocks and a tail
    src = _store(tmp_path / "src")
    cid = src.add_file(path, CHUNK)
    dst = _store(tmp_path / "dst", direct_writes=direct)
    part = dst.begin(cid, src.manifest_bytes(cid))
    assert part.direct is direct  # /tmp is ext4 here; tmpfs would say no (plain writes)
    for i in (5, 0, 3, 1, 4, 2):
        part.write(i, np.frombuffer(data[i * CHUNK : (i + 1) * CHUNK], np.uint8))
    dst.finish(part)
    assert dst.data_path(cid).read_bytes() == data and _read_all(dst, cid) == data
    odd = src.add_file(_blob(tmp_path, 3 * 6000, "odd")[0], 6000)
    assert dst.begin(odd, src.manifest_bytes(odd)).direct is False  # not whole 4 KiB blocks: plain writes


def test_served_chunks_are_hashed_once_while_the_file_is_unchanged(tmp_path):
    path, data = _blob(tmp_path, 3 * CHUNK)
    store = _store(tmp_path)
    cid = store.add_file(path, CHUNK)  # hashed on the way in
    buf = np.empty(CHUNK, np.uint8)

    def serve() -> tuple[int, list]:
        reader = store.reader(cid)
        out = []
        for i in range(3):
            chunk = reader.read_now(i, buf)  # what the event loop tries first
            out.append(bytes(chunk if chunk is not None else reader.read(i, buf)))
        reader.close()
        assert b"".join(out) == data
        return reader.hashed, reader.bad

    assert serve() == (0, [])
    os.chmod(store.data_path(cid), 0o444)  # a chmod moves the ctime: the file may have changed
    assert serve() == (3, [])
    assert serve() == (0, [])
    store.close()
    assert _store(tmp_path).reader(cid).read_now(0, buf) is None  # after a restart: hashed first


def test_store_open_drops_what_does_not_check_out(tmp_path):
    store = _store(tmp_path)
    a = store.add_file(_blob(tmp_path, 2 * CHUNK, "a")[0], CHUNK)
    b = store.add_file(_blob(tmp_path, 2 * CHUNK, "b")[0], CHUNK)
    c_path, _c_data = _blob(tmp_path, 2 * CHUNK, "c")
    c = store.add_file(c_path, CHUNK)
    store.close()
    os.chmod(store.data_path(a), 0o644)
    with open(store.data_path(a), "ab") as f:  # wrong size
        f.write(b"x")
    manifest_b = tmp_path / "content" / "manifests" / str(b)
    manifest_b.write_bytes(manifest_b.read_bytes().replace(b'"blob"', b'"blob" '))  # no longer its hash
    os.chmod(store.data_path(c), 0o644)
    with open(store.data_path(c), "r+b") as f:  # same size, one chunk flipped
        f.write(b"\0" * 16)
    quick = _store(tmp_path)
    assert quick.state(a) is None and quick.state(b) is None and quick.stats["dropped_on_open"] == 2
    assert quick.state(c) == "complete"  # only a full check sees it ...
    reader = quick.reader(c)
    assert (
        reader.read(0, np.empty(CHUNK, np.uint8)) is None
        and reader.read(1, np.empty(CHUNK, np.uint8)) is not None
    )
    reader.close()
    quick.damaged(c, reader.bad)  # ... or serving it: never passed on, and it becomes partial
    assert quick.state(c) == "partial" and quick.listing()[0]["have_chunks"] == 1
    quick.close()
    full = _store(tmp_path, verify_on_open=True)
    assert full.state(c) == "partial"


def test_store_quota_evicts_unpinned_lru_and_refuses_when_pinned(tmp_path):
    store = _store(tmp_path, max_bytes=5 * CHUNK)
    old = store.add_file(_blob(tmp_path, 2 * CHUNK, "old")[0], CHUNK)
    kept = store.add_file(_blob(tmp_path, 2 * CHUNK, "kept")[0], CHUNK)
    store.pin(kept)
    new = store.add_file(_blob(tmp_path, 2 * CHUNK, "new")[0], CHUNK)  # room made by dropping `old`
    assert store.state(old) is None and store.state(new) == "complete" and store.stats["evicted"] == 1
    store.pin(new)
    with pytest.raises(StoreFull, match="content_max_bytes"):
        store.add_file(_blob(tmp_path, 2 * CHUNK, "more")[0], CHUNK)
    assert store.used_bytes() <= 5 * CHUNK
    store.unpin(new)
    assert store.gc() == {"removed": 1, "freed_bytes": 2 * CHUNK}
    assert [row["cid"] for row in store.listing()] == [str(kept)]


# -- configuration
def test_content_limits_come_from_a_node_content_table(tmp_path):
    from lattice.config import NodeConfig
    from lattice.errors import ConfigError

    path = tmp_path / "node.toml"
    path.write_text(
        '[node]\ncontent_max_bytes = "2GiB"\n'
        "[node.content]\nserve_peer_requests = 2\nfetch_max_providers = 3\n"
    )
    cfg = NodeConfig.load(path, env={}).content_config
    assert cfg.max_bytes == 2 << 30 and cfg.serve_peer_requests == 2 and cfg.fetch.max_providers == 3
    for bad in ({"serve_peer_request": 2}, {"serve_peer_requests": -1}, {"serve_peer_requests": 1.5},
                {"verify_on_open": 1}, {"chunk_size": 3}, {"fetch_request_timeout": "x"}):  # fmt: skip
        with pytest.raises(ConfigError) as info:
            NodeConfig(data_dir=tmp_path, content=bad)
        assert "\n" not in str(info.value)
