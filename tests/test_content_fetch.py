"""lattice.content between real nodes on loopback: add, find in the DHT, get, resume, range reads,
and a receiver that stays bounded whatever a provider sends."""

from __future__ import annotations

import os
from contextlib import AsyncExitStack

import numpy as np
import pytest
import trio

from lattice import Node, NodeConfig
from lattice.content import Content, ContentConfig, ContentNotFound, FetchLimits
from lattice.content.protocol import CHUNKS, MANIFEST
from lattice.dht.service import DHT
from lattice.rpc import RPC

CHUNK = 64 << 10


async def start_nodes(tmp_path, nursery, count: int, services=None, join: bool = True) -> list:
    """``count`` nodes on loopback (``services(i)`` gives node i's services, default: all), each
    connected to the first; they run until the test ends."""
    nodes: list = []
    ready = trio.Event()

    async def run() -> None:
        async with AsyncExitStack() as stack:
            for i in range(count):
                cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / f"n{i}", control=False)
                node = Node(cfg, services=services(i) if services else None)
                nodes.append(await stack.enter_async_context(node))
                if join and i:
                    await node.connect(nodes[0].addrs[0])
            ready.set()
            await trio.sleep_forever()

    nursery.start_soon(run)
    with trio.fail_after(10):
        await ready.wait()
    return nodes


def all_services(content: ContentConfig | None = None):
    from lattice.node import default_services

    out = default_services()
    if content is not None:
        out[-1] = Content(content)
    return out


async def test_get_finds_providers_in_the_dht_and_then_provides_itself(tmp_path, nursery):
    a, b, c = await start_nodes(tmp_path, nursery, 3)
    data = os.urandom(3 * CHUNK + 123)
    cid = await a.content.add(data, chunk_size=CHUNK)
    with trio.fail_after(10):
        while not await b.dht.find_providers(b"/lattice/content/" + cid.to_bytes()):
            await trio.sleep(0.05)
    path = await b.content.get(cid)  # no provider named: the DHT says who has it
    assert path.read_bytes() == data
    # (split, with the counters in the message: a rare "5 == 4" here was seen once in a full run)
    assert b.content.counters["chunks_fetched"] == 4, b.content.counters
    assert a.content.counters["chunks_served"] == 4, (a.content.counters, b.content.counters)
    await a.content.unpin(str(cid))
    await a.content.gc()  # a no longer has it; b announced it after its get
    assert a.content.store.state(cid) is None
    out = tmp_path / "copy.bin"
    with trio.fail_after(10):
        while True:
            try:
                assert await c.content.get(cid, out) == out
                break
            except ContentNotFound:  # b's announcement may still be on its way
                await trio.sleep(0.1)
    assert out.read_bytes() == data
    assert b.content.counters["chunks_served"] == 4, (b.content.counters, c.content.counters)
    status = await c.content.status()
    assert status["store"]["objects"] == 1 and status["objects"][0]["pinned"]


async def test_a_get_limited_to_the_named_providers_asks_no_one_else(tmp_path, nursery):
    a, b, c = await start_nodes(tmp_path, nursery, 3)
    data = os.urandom(4 * CHUNK)
    cid = await a.content.add(data, chunk_size=CHUNK)
    assert await b.content.add(data, chunk_size=CHUNK) == cid
    with trio.fail_after(10):  # both announced: the DHT names both to c
        while len(await c.dht.find_providers(b"/lattice/content/" + cid.to_bytes())) < 2:
            await trio.sleep(0.05)
    with pytest.raises(ContentNotFound):  # nobody named, no lookup: nothing to fetch from
        await c.content.get(cid, discover=False)
    assert await c.content.get(cid, providers=[a.addrs[0]], discover=False, pin=False)
    assert a.content.counters["chunks_served"] == 4 and b.content.counters["chunks_served"] == 0


async def two_slow_providers(tmp_path, nursery, discover_interval: float):
    """Nodes a and b provide the same 8 chunks, served at 256 KiB/s per peer, and c's DHT names
    both; c fetches with ``discover_interval``. Returns (a, b, c, cid, data)."""
    config = ContentConfig(serve_peer_rate=256 << 10, fetch=FetchLimits(discover_interval=discover_interval))
    a, b, c = await start_nodes(tmp_path, nursery, 3, services=lambda i: all_services(config))
    data = os.urandom(8 * CHUNK)
    cid = await a.content.add(data, chunk_size=CHUNK)
    assert await b.content.add(data, chunk_size=CHUNK) == cid
    with trio.fail_after(10):
        while len(await c.dht.find_providers(b"/lattice/content/" + cid.to_bytes())) < 2:
            await trio.sleep(0.05)
    return a, b, c, cid, data


async def test_a_long_get_from_named_providers_only_never_adds_the_dhts(tmp_path, nursery):
    """``discover=False`` holds for the whole fetch, not only its start (the periodic discovery
    once added the DHT's providers after ``discover_interval``)."""
    # 512 KiB at 256 KiB/s from a: ~2 s, 40 discovery intervals
    a, b, c, cid, data = await two_slow_providers(tmp_path, nursery, discover_interval=0.05)
    with trio.fail_after(20):
        path = await c.content.get(cid, providers=[a.addrs[0]], discover=False, pin=False)
    assert path.read_bytes() == data
    assert a.content.counters["chunks_served"] == 8 and b.content.counters["chunks_served"] == 0


async def test_named_providers_start_at_once_and_the_dhts_join_as_found(tmp_path, nursery):
    """With providers named and discovery on, the fetch does not wait for the DHT lookup: it starts
    with the named one and adds the DHT's as soon as the lookup answers (not a discovery interval
    later)."""
    a, b, c, cid, data = await two_slow_providers(tmp_path, nursery, discover_interval=600)
    with trio.fail_after(20):
        path = await c.content.get(cid, providers=[a.addrs[0]], pin=False)
    assert path.read_bytes() == data
    assert a.content.counters["chunks_served"] > 0 and b.content.counters["chunks_served"] > 0


async def test_an_interrupted_get_resumes_with_only_the_missing_chunks(tmp_path, nursery):
    slow = ContentConfig(serve_peer_rate=8 * CHUNK)  # 8 chunks per second: the get is cut mid-way
    a, b = await start_nodes(tmp_path, nursery, 2, services=lambda i: all_services(slow if i == 0 else None))
    data = os.urandom(24 * CHUNK)
    cid = await a.content.add(data, chunk_size=CHUNK)
    seen: list[dict] = []
    with trio.CancelScope() as scope:

        def stop_after_some(progress: dict) -> None:
            seen.append(progress)
            if progress["fetched"] >= 5:
                scope.cancel()

        await b.content.get(cid, providers=[a.addrs[0]], on_progress=stop_after_some)
    assert scope.cancelled_caught
    had = (await b.content.status())["objects"][0]["have_chunks"]
    assert 5 <= had < 24
    a.content.config.serve_peer_rate = 0.0
    final: list[dict] = []
    path = await b.content.get(cid, providers=[a.addrs[0]], on_progress=final.append)
    assert path.read_bytes() == data
    assert final[-1]["had"] == had and final[-1]["fetched"] == 24 - had
    assert b.content.counters["chunks_fetched"] == 24  # every chunk moved once over both attempts


async def test_get_tensors_fetches_only_the_chunks_holding_them(tmp_path, nursery):
    a, b = await start_nodes(tmp_path, nursery, 2)
    tensors = {f"layer.{i}.w": np.random.default_rng(i).random((64, 256), np.float32) for i in range(6)}
    cid = await a.content.add(tensors, chunk_size=CHUNK)
    manifest = a.content.store.manifest(cid)
    assert manifest.kind == "safetensors" and len(manifest.tensors) == 6
    names = ["layer.4.w", "layer.1.w"]
    got = await b.content.get_tensors(cid, names, providers=[a.addrs[0]])
    for name in names:
        np.testing.assert_array_equal(got[name], tensors[name])
    needed = manifest.chunks_for(names)
    assert a.content.counters["chunks_served"] == len(needed) < manifest.count
    # the whole file later: only the other chunks move, and any safetensors reader can open it
    path = await b.content.get(cid, tmp_path / "all.safetensors", providers=[a.addrs[0]])
    from safetensors.numpy import load_file

    loaded = load_file(str(path))
    assert all(np.array_equal(loaded[k], v) for k, v in tensors.items())
    assert a.content.counters["chunks_served"] == manifest.count


async def test_metadata_fetches_only_the_header_of_a_safetensors_file(tmp_path, nursery):
    """A model's file says what it is in its header (config, tokenizer): a peer reads that much and
    no tensor chunk; a header over the limit is refused before it is fetched."""
    from safetensors.numpy import save_file

    from lattice.content.errors import ContentError

    a, b = await start_nodes(tmp_path, nursery, 2)
    meta = {"format": "test/1", "tokenizer": "t" * (3 * CHUNK)}  # a header spanning 4 chunks
    tensors = {f"w{i}": np.random.default_rng(i).random((128, 256), np.float32) for i in range(4)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata=meta)
    cid = await a.content.add(path, chunk_size=CHUNK)
    manifest = a.content.store.manifest(cid)
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with pytest.raises(ContentError, match="more than the"):
        await b.content.metadata(cid, providers=[a.addrs[0]], max_bytes=2 * CHUNK)
    assert await b.content.metadata(cid, providers=[a.addrs[0]]) == meta
    assert a.content.counters["chunks_served"] == len(manifest.chunks_in(0, header)) == 4 < manifest.count
    with pytest.raises(ContentError, match="not a safetensors file"):
        await b.content.metadata(await a.content.add(b"plain bytes"), providers=[a.addrs[0]])


def rogue_services(i: int, behaviour: dict, config: ContentConfig | None = None):
    """Node 0 is a rogue provider (RPC and DHT only, its own content handlers); others are honest
    (with ``config`` if given)."""
    if i != 0:
        return all_services(config)
    rpc = RPC()

    async def manifest(payload, ctx):
        yield np.frombuffer(behaviour["manifest"], np.uint8)

    async def chunks(payload, ctx):
        for index in payload["chunks"]:
            yield {"i": index, "d": behaviour["reply"](index)}

    rpc.register(MANIFEST, manifest, stream="server")
    rpc.register(CHUNKS, chunks, stream="server")
    return [rpc, DHT()]


@pytest.mark.parametrize(
    ("attack", "hash_on_loop_cpus"),
    [("oversized", 2), ("corrupt", 0), ("corrupt", 1 << 16)],  # corrupt: hashed in threads, on the loop
)
async def test_a_provider_sending_oversized_or_corrupt_chunks_is_dropped_and_the_result_is_right(
    tmp_path, nursery, attack, hash_on_loop_cpus
):
    behaviour: dict = {}
    fetch = FetchLimits(hash_on_loop_cpus=hash_on_loop_cpus)
    rogue, honest, fetcher = await start_nodes(
        tmp_path, nursery, 3, services=lambda i: rogue_services(i, behaviour, ContentConfig(fetch=fetch))
    )
    assert fetcher.content.config.fetch.hash_on_loop_cpus == hash_on_loop_cpus
    data = os.urandom(8 * CHUNK)
    cid = await honest.content.add(data, chunk_size=CHUNK)
    behaviour["manifest"] = honest.content.store.manifest_bytes(cid)
    if attack == "oversized":  # 64 MiB per reply: must be refused before it is allocated
        behaviour["reply"] = lambda index: np.zeros(64 << 20, np.uint8)
    else:
        behaviour["reply"] = lambda index: np.frombuffer(os.urandom(CHUNK), np.uint8)
    path = await fetcher.content.get(cid, providers=[rogue.addrs[0], honest.addrs[0]])
    assert path.read_bytes() == data
    bad = fetcher.content.bad_providers
    assert list(bad) == [str(rogue.peer_id)]
    reason = bad[str(rogue.peer_id)][1]
    assert ("over the limit" in reason) if attack == "oversized" else ("does not match its hash" in reason)
    assert fetcher.host.limits.score(rogue.peer_id) > 0  # and a misbehaviour mark on its record
    # it is not asked again (chunks already in flight when the first bad one came may count too)
    bad_chunks = fetcher.content.counters["bad_chunks"]
    assert 1 <= bad_chunks <= 4
    behaviour["reply"] = lambda index: np.frombuffer(data[index * CHUNK : (index + 1) * CHUNK], np.uint8)
    await fetcher.content.unpin(str(cid))
    await fetcher.content.gc()
    await fetcher.content.get(cid, providers=[rogue.addrs[0], honest.addrs[0]])
    assert fetcher.content.counters["bad_chunks"] == bad_chunks


async def test_a_rogue_among_honest_providers_never_loses_a_chunk(tmp_path, nursery):
    """A chunk that arrived but was still waiting for the write queue when its request was cancelled
    (the rogue dropped, an endgame loser) went nowhere: the fetch hung with one chunk missing."""
    behaviour: dict = {}
    rogue, honest, fetcher, *others = await start_nodes(
        tmp_path, nursery, 6, services=lambda i: rogue_services(i, behaviour)
    )
    data = os.urandom(128 * CHUNK)
    cid = await honest.content.add(data, chunk_size=CHUNK)
    for other in others:
        await other.content.add(data, chunk_size=CHUNK)
    behaviour["manifest"] = honest.content.store.manifest_bytes(cid)
    behaviour["reply"] = lambda index: np.frombuffer(os.urandom(CHUNK), np.uint8)
    for _ in range(3):
        with trio.fail_after(10):
            path = await fetcher.content.get(cid, providers=[rogue.addrs[0], honest.addrs[0]], pin=False)
        assert path.read_bytes() == data
        assert list(fetcher.content.bad_providers) == [str(rogue.peer_id)]
        fetcher.content.bad_providers.clear()  # ask the rogue again next time
        await fetcher.content.gc()


async def test_a_provider_answers_a_request_for_many_chunks_it_lacks(tmp_path, nursery):
    """A partial object is served while it is fetched: a request naming more missing chunks than
    the provider has read buffers is answered at once (a missing chunk's buffer is reused)."""
    src, partial_holder, asker = await start_nodes(tmp_path, nursery, 3)
    data = os.urandom(8 * CHUNK)
    cid = await src.content.add(data, chunk_size=CHUNK)
    store = partial_holder.content.store
    part = store.begin(cid, src.content.store.manifest_bytes(cid))  # open: being fetched
    for i in (0, 4):
        part.write(i, data[i * CHUNK : (i + 1) * CHUNK])
    with trio.fail_after(5):
        async with asker.rpc.call_stream(
            partial_holder.addrs[0], CHUNKS, {"cid": str(cid), "chunks": list(range(8))}, as_torch=False
        ) as items:
            replies = [item async for item in items]
    assert [r["i"] for r in replies] == list(range(8))
    assert [i for i, r in enumerate(replies) if r.get("missing")] == [1, 2, 3, 5, 6, 7]
    assert bytes(replies[4]["d"]) == data[4 * CHUNK : 5 * CHUNK]
    store.release(part)


async def test_chunks_are_verified_and_written_a_batch_per_worker_thread_call(tmp_path, nursery):
    """A worker-thread hop costs ~0.15-0.2 ms of CPU: chunks go to the writer threads in batches
    (``write_batch``), not one hop per chunk; every chunk is still verified and the bytes are right."""
    config = ContentConfig(fetch=FetchLimits(write_batch=4, write_linger=1.0))
    a, b = await start_nodes(tmp_path, nursery, 2, services=lambda i: all_services(config))
    data = os.urandom(64 * CHUNK)
    cid = await a.content.add(data, chunk_size=CHUNK)
    with trio.fail_after(10):
        path = await b.content.get(cid, providers=[a.addrs[0]], pin=False)
    assert path.read_bytes() == data and b.content.counters["chunks_fetched"] == 64
    # one hop per chunk would be 64; batches of 4 make 16, and a full write queue flushes the
    # batches early (timing: 33 calls seen once in a full CI run), so the bound leaves room
    assert b.content.counters["write_calls"] <= 48


async def test_write_batch_hands_over_when_full_flushed_closed_or_after_its_linger():
    from lattice.content.fetch import WriteBatch

    batch = WriteBatch(3)
    for i in range(3):
        batch.add(i, b"x")
    with trio.fail_after(1):
        assert [item[0] for item in await batch.take(10.0)] == [0, 1, 2]  # full: at once
    batch.add(3, b"x")
    start = trio.current_time()
    assert [item[0] for item in await batch.take(0.2)] == [3]  # not full: after the linger
    assert trio.current_time() - start >= 0.2
    batch.add(4, b"x")
    batch.flush()  # the write queue is full: no lingering
    with trio.fail_after(1):
        assert [item[0] for item in await batch.take(10.0)] == [4]
        batch.add(5, b"x")
        batch.close()
        assert [item[0] for item in await batch.take(10.0)] == [5]
        assert await batch.take(10.0) == []  # closed and drained: the writer stops


async def _peak_requests(provider, done: trio.Event) -> int:
    """The most content requests the provider served at once until ``done``."""
    peak = 0
    while not done.is_set():
        peak = max(peak, provider.content.admission.active)
        await trio.sleep(0.0005)
    return peak


async def test_a_worker_asks_for_its_next_batch_before_the_current_one_ends(tmp_path, nursery):
    """The link does not idle between batches: with one worker per provider, its next request is
    already being served while the last chunks of the current one arrive (``request_ahead``)."""
    fetch = FetchLimits(requests_per_provider=1, max_batch=4, request_ahead=2)
    config = ContentConfig(fetch=fetch, serve_peer_rate=float(8 << 20))  # ~0.5 s for 64 chunks
    a, b = await start_nodes(tmp_path, nursery, 2, services=lambda i: all_services(config))
    data = os.urandom(64 * CHUNK)
    cid = await a.content.add(data, chunk_size=CHUNK)
    done = trio.Event()
    peak: list[int] = []

    async def watch() -> None:
        peak.append(await _peak_requests(a, done))

    nursery.start_soon(watch)
    with trio.fail_after(10):
        path = await b.content.get(cid, providers=[a.addrs[0]], pin=False)
    done.set()
    await trio.sleep(0.01)
    assert path.read_bytes() == data
    assert peak == [2]  # never more than two per worker


async def test_a_provider_refusing_requests_asked_ahead_still_serves_the_whole_fetch(tmp_path, nursery):
    """A provider that serves one request per peer refuses the one asked ahead (busy, not a
    failure): the worker then asks one at a time, the provider is not dropped, the bytes are right."""
    config = ContentConfig(fetch=FetchLimits(requests_per_provider=1, max_batch=4), serve_peer_requests=1)
    a, b = await start_nodes(tmp_path, nursery, 2, services=lambda i: all_services(config))
    data = os.urandom(64 * CHUNK)
    cid = await a.content.add(data, chunk_size=CHUNK)
    with trio.fail_after(10):
        path = await b.content.get(cid, providers=[a.addrs[0]], pin=False)
    assert path.read_bytes() == data and not b.content.bad_providers
    assert a.content.counters["refused"] <= 2  # asked ahead once or twice, then one at a time
