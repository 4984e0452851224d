"""The content store as a service on real nodes (issue 20, step 3): pins and announcements, the
quota, garbage collection, and the integrity checks (on open, when serving) with repair."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from lattice import Node, NodeConfig
from lattice.content import Content, ContentConfig, ContentNotFound, StoreFull
from lattice.content.protocol import CHUNKS, provider_key
from lattice.node import default_services
from test_content_fetch import start_nodes

CHUNK = 64 << 10


def with_content(config: ContentConfig):
    out = default_services()
    out[-1] = Content(config)
    return out


async def test_pinned_content_is_announced_and_reannounced_and_unpinning_withdraws_it(tmp_path, nursery):
    a, b = await start_nodes(
        tmp_path, nursery, 2, services=lambda i: with_content(ContentConfig(announce_interval=0.3))
    )
    announced: list[bytes] = []
    provide = a.dht.provide

    async def counting(key):
        announced.append(key)
        return await provide(key)

    a.dht.provide = counting
    cid = await a.content.add(os.urandom(2 * CHUNK), chunk_size=CHUNK)
    key = provider_key(cid)
    with trio.fail_after(5):
        while announced.count(key) < 3:  # at once, then every announce_interval
            await trio.sleep(0.05)
    assert [p for p, _ in await b.dht.find_providers(key)] == [str(a.peer_id)]
    assert await a.content.unpin(str(cid)) is True
    assert a.peer_id not in [p for p, _ in a.dht.store.get_providers(key)]  # no longer listed here
    count = announced.count(key)
    await trio.sleep(0.8)
    assert announced.count(key) == count  # and no longer announced
    assert (await a.content.gc())["removed"] == 1 and a.content.store.state(cid) is None
    b.dht.store.remove_provider(key, a.peer_id)  # (others' entries expire within a day)
    with pytest.raises(ContentNotFound):
        await b.content.get(cid)


async def test_the_quota_refuses_before_fetching_and_makes_room_from_unpinned_content(tmp_path, nursery):
    small = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / "small", control=False,
                       content_max_bytes=5 * CHUNK)  # fmt: skip
    (a,) = await start_nodes(tmp_path, nursery, 1)
    first = await a.content.add(os.urandom(3 * CHUNK), chunk_size=CHUNK)
    second = await a.content.add(os.urandom(3 * CHUNK), chunk_size=CHUNK)
    async with Node(small) as b:
        await b.connect(a.addrs[0])
        await b.content.get(first, providers=[a.addrs[0]])
        served = a.content.counters["chunks_served"]
        with pytest.raises(StoreFull, match="content_max_bytes"):
            await b.content.get(second, providers=[a.addrs[0]])
        assert a.content.counters["chunks_served"] == served  # refused before a chunk moved
        assert b.content.store.state(second) is None and b.content.store.used_bytes() <= 5 * CHUNK
        await b.content.unpin(str(first))  # unpinned: the next get may drop it
        await b.content.get(second, providers=[a.addrs[0]])
        assert b.content.store.state(first) is None and b.content.store.state(second) == "complete"
        assert b.content.store.usage()["evicted"] == 1


def _corrupt(path: Path, offset: int) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 32)


async def test_a_chunk_corrupt_on_disk_is_never_served_and_is_repaired_from_peers(tmp_path, nursery):
    config = ContentConfig(announce_interval=0.2)
    a, b, c = await start_nodes(tmp_path, nursery, 3, services=lambda i: with_content(config))
    data = os.urandom(6 * CHUNK)
    cid = await a.content.add(data, chunk_size=CHUNK)
    await b.content.get(cid, providers=[a.addrs[0]])  # b holds (and serves) it too
    _corrupt(a.content.store.data_path(cid), 2 * CHUNK + 100)
    async with c.rpc.call_stream(a.addrs[0], CHUNKS, {"cid": str(cid), "chunks": [1, 2]}) as items:
        replies = [item async for item in items]
    assert replies[0]["i"] == 1 and bytes(replies[0]["d"]) == data[CHUNK : 2 * CHUNK]
    assert replies[1] == {"i": 2, "missing": True}  # read, found corrupt, not passed on
    assert a.content.store.stats["corrupt_chunks"] == 1
    with trio.fail_after(5):  # a, pinned, repairs itself from b: only the lost chunk moves
        while a.content.store.state(cid) != "complete" or a.content.fetches:
            await trio.sleep(0.05)
    assert a.content.counters["chunks_fetched"] == 1
    assert a.content.store.data_path(cid).read_bytes() == data


async def test_a_full_check_on_open_finds_damage_and_a_restarted_node_repairs_it(tmp_path, nursery):
    (b,) = await start_nodes(tmp_path, nursery, 1)
    data = os.urandom(6 * CHUNK)
    cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / "a", control=False)
    async with Node(cfg) as a:
        cid = await a.content.add(data, chunk_size=CHUNK)
        await b.content.get(cid, providers=[a.addrs[0]])
    _corrupt(tmp_path / "a" / "content" / "data" / str(cid), 4 * CHUNK)
    checked = with_content(ContentConfig(verify_on_open=True, announce_interval=0.2))
    async with Node(cfg, services=checked) as a:
        assert a.content.store.state(cid) == "partial"  # found at start, never served
        assert a.content.store.stats["corrupt_chunks"] == 1
        await a.connect(b.addrs[0])
        with trio.fail_after(10):
            while a.content.store.state(cid) != "complete" or a.content.fetches:
                await trio.sleep(0.05)
        assert a.content.counters["chunks_fetched"] == 1
        assert (tmp_path / "a" / "content" / "data" / str(cid)).read_bytes() == data


async def test_a_get_cut_by_a_restart_resumes_with_only_the_missing_chunks(tmp_path, nursery):
    slow = with_content(ContentConfig(serve_peer_rate=8 * CHUNK))
    (a,) = await start_nodes(tmp_path, nursery, 1, services=lambda i: slow)
    data = os.urandom(20 * CHUNK)
    cid = await a.content.add(data, chunk_size=CHUNK)
    cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / "b", control=False)
    async with Node(cfg) as b:
        with trio.move_on_after(1.0):  # ~8 chunks in, the node stops
            await b.content.get(cid, providers=[a.addrs[0]])
    a.content.config.serve_peer_rate = 0.0
    async with Node(cfg) as b:
        have = b.content.store.listing()[0]
        assert have["state"] == "partial" and 0 < have["have_chunks"] < 20
        final: list[dict] = []
        await b.content.get(cid, providers=[a.addrs[0]], on_progress=final.append)
        assert final[-1]["had"] == have["have_chunks"] and final[-1]["fetched"] == 20 - have["have_chunks"]
        assert b.content.store.data_path(cid).read_bytes() == data


async def test_a_provider_hashes_a_chunk_once_while_its_file_is_unchanged(tmp_path, nursery):
    a, b = await start_nodes(tmp_path, nursery, 2)
    data = os.urandom(6 * CHUNK + 100)
    cid = await a.content.add(data, chunk_size=CHUNK)  # hashed on the way in: known good

    async def fetch_again() -> None:
        await b.content.unpin(str(cid))
        await b.content.gc()
        assert (await b.content.get(cid, providers=[a.addrs[0]])).read_bytes() == data

    await fetch_again()
    assert a.content.counters["chunks_served"] == 7 and a.content.counters["chunks_hashed"] == 0
    os.utime(a.content.store.data_path(cid))  # the same bytes, but the file may have changed
    await fetch_again()
    assert a.content.counters["chunks_hashed"] == 7  # hashed again, once
    await fetch_again()
    assert a.content.counters["chunks_served"] == 21 and a.content.counters["chunks_hashed"] == 7
    # b fetched it: verified before written, so b serves it without hashing too
    (c,) = await start_nodes(tmp_path / "c", nursery, 1)
    await c.connect(b.addrs[0])
    assert (await c.content.get(cid, providers=[b.addrs[0]])).read_bytes() == data
    assert b.content.counters["chunks_served"] == 7 and b.content.counters["chunks_hashed"] == 0


@pytest.mark.parametrize("chunk", [CHUNK, 6000])  # 6000: not whole 4 KiB blocks, so no O_DIRECT
async def test_fetched_chunks_are_written_right_with_a_write_queue_of_one(tmp_path, nursery, chunk):
    from lattice.content import FetchLimits

    config = ContentConfig(fetch=FetchLimits(write_queue=1, max_batch=4))
    a, b = await start_nodes(tmp_path, nursery, 2, services=lambda i: with_content(config))
    data = os.urandom(9 * chunk + 1234)
    cid = await a.content.add(data, chunk_size=chunk)
    path = await b.content.get(cid, providers=[a.addrs[0]])
    assert path.read_bytes() == data and b.content.counters["chunks_fetched"] == 10


async def test_fetched_chunks_go_to_disk_from_the_receive_buffer_without_a_copy(tmp_path, nursery):
    """Large tensors arrive page-aligned (lattice.codec), so O_DIRECT writes need no bounce copy."""
    a, b = await start_nodes(tmp_path, nursery, 2)
    data = os.urandom(7 * CHUNK)
    cid = await a.content.add(data, chunk_size=CHUNK)
    path = await b.content.get(cid, providers=[a.addrs[0]])
    assert path.read_bytes() == data and b.content.counters["chunks_fetched"] == 7
    assert b.content.counters["chunks_copied"] == 0


def test_a_partial_copies_only_unaligned_chunks_for_o_direct(tmp_path):
    from lattice.codec.buffers import aligned_empty
    from lattice.content.store import Store, address

    store = Store(tmp_path / "store", 1 << 30)
    store.open()
    data = os.urandom(3 * CHUNK)
    cid = store.add_file(_write(tmp_path / "f", data), CHUNK)
    raw = store.manifest_bytes(cid)
    store.remove(cid)
    partial = store.begin(cid, raw)
    aligned = aligned_empty(CHUNK)
    aligned[:] = memoryview(data)[:CHUNK]
    assert address(aligned.data) % 4096 == 0
    partial.write(0, aligned)
    for index in (1, 2):  # off a page boundary for sure (a bytes object may land on one by chance)
        unaligned = aligned_empty(CHUNK + index)[index:]
        unaligned[:] = memoryview(data)[index * CHUNK : (index + 1) * CHUNK]
        assert address(unaligned.data) % 4096 == index
        partial.write(index, unaligned)
    assert partial.complete and partial.read(0, len(data)) == data
    assert partial.bounced == (0 if not partial.direct else 2)
    store.release(partial)
    store.close()


def test_a_partial_writes_a_run_of_aligned_chunks_in_one_call_and_the_rest_one_by_one(tmp_path):
    from lattice.codec.buffers import aligned_empty
    from lattice.content.store import Store

    store = Store(tmp_path / "store", 1 << 30)
    store.open()
    data = os.urandom(7 * CHUNK + 1000)  # 8 chunks, the last one short
    cid = store.add_file(_write(tmp_path / "f", data), CHUNK)
    raw = store.manifest_bytes(cid)
    store.remove(cid)
    partial = store.begin(cid, raw)

    def chunk(index: int, offset: int = 0):
        piece = memoryview(data)[index * CHUNK : (index + 1) * CHUNK]
        buf = aligned_empty(len(piece) + offset)[offset:]
        buf[:] = piece
        return buf

    calls = []
    real = os.pwritev
    os.pwritev = lambda fd, views, offset: calls.append(len(views)) or real(fd, views, offset)
    try:  # 0-2 a run (given out of order), 3 unaligned, 5-6 a run, 7 short
        given = [(2, chunk(2)), (0, chunk(0)), (1, chunk(1)), (3, chunk(3, 8)), (5, chunk(5)), (6, chunk(6))]
        partial.write_verified([*given, (7, chunk(7))])
    finally:
        os.pwritev = real
    assert list(partial.have) == [1, 1, 1, 1, 0, 1, 1, 1]
    assert calls == ([3, 2] if partial.direct else [])  # without O_DIRECT (tmpfs) one by one
    partial.write_verified([(4, chunk(4))])
    assert partial.complete and partial.read(0, len(data)) == data
    assert store.partial_paths(cid)[1].read_bytes()[:8] == bytes([1] * 8)  # what a resume trusts
    store.finish(partial)
    assert store.read_range(cid, 0, len(data)) == data
    store.close()


@pytest.mark.parametrize(("chunk", "slots"), [(4 << 20, 8), (1 << 20, 32), (64 << 10, 32)])
def test_the_write_queue_holds_at_most_as_many_mib_as_chunks(tmp_path, chunk, slots):
    """32 waiting chunks of 4 MiB would be 128 MiB of receiver memory: large chunks get fewer slots."""
    from lattice.content import FetchLimits
    from lattice.content.fetch import Fetch
    from lattice.content.store import Store

    store = Store(tmp_path / "store", 1 << 30)
    store.open()
    cid = store.add_file(_write(tmp_path / "f", os.urandom(chunk + 1)), chunk)
    raw = store.manifest_bytes(cid)
    store.remove(cid)
    partial = store.begin(cid, raw)
    assert Fetch(None, partial, FetchLimits(write_queue=32)).write_slots == slots
    store.release(partial)
    store.close()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
