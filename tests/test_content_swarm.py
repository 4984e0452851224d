"""One fetch from many providers at once (real nodes on loopback): faster providers get more chunks,
the last ones are raced (endgame), a stalled provider does not hold the fetch up, and the fetcher's
scores remember who was fast."""

from __future__ import annotations

import os

import numpy as np
import trio

from lattice.content import Content, ContentConfig
from lattice.content.protocol import CHUNKS, MANIFEST
from lattice.dht.service import DHT
from lattice.node import default_services
from lattice.rpc import RPC
from test_content_fetch import start_nodes

CHUNK = 64 << 10


def services(i: int, behaviour: dict):
    """Nodes 0-1: unlimited providers; 2: a provider capped at 4 chunks/s; 3: a provider that never
    answers a chunk request (stalls); 4: the fetcher."""
    if i == 3:
        rpc = RPC()

        async def manifest(payload, ctx):
            yield np.frombuffer(behaviour["manifest"], np.uint8)

        async def chunks(payload, ctx):
            behaviour["stalled"] = behaviour.get("stalled", 0) + 1
            await trio.sleep_forever()
            yield None

        rpc.register(MANIFEST, manifest, stream="server")
        rpc.register(CHUNKS, chunks, stream="server")
        return [rpc, DHT()]
    out = default_services()
    if i == 2:
        out[-1] = Content(ContentConfig(serve_peer_rate=4 * CHUNK))
    return out


async def test_four_providers_fast_ones_take_more_and_a_stalled_one_does_not_hold_the_end(tmp_path, nursery):
    behaviour: dict = {}
    nodes = await start_nodes(tmp_path, nursery, 5, services=lambda i: services(i, behaviour), join=False)
    fetcher = nodes[4]
    data = os.urandom(40 * CHUNK + 17)
    cids = [await node.content.add(data, chunk_size=CHUNK) for node in nodes[:3]]
    assert len(set(cids)) == 1
    cid = cids[0]
    behaviour["manifest"] = nodes[0].content.store.manifest_bytes(cid)
    providers = [nodes[i].addrs[0] for i in (3, 2, 0, 1)]  # the stalled and the slow one first
    progress: list[dict] = []
    started = trio.current_time()
    with trio.fail_after(10):  # a stalled request times out after 30 s: the endgame must not wait for it
        path = await fetcher.content.get(cid, providers=providers, on_progress=progress.append)
    elapsed = trio.current_time() - started
    assert path.read_bytes() == data
    final = progress[-1]
    per = {peer: row["chunks"] for peer, row in final["per_provider"].items()}
    fast = per[str(nodes[0].peer_id)] + per[str(nodes[1].peer_id)]
    slow = per[str(nodes[2].peer_id)]
    assert per[str(nodes[3].peer_id)] == 0 and behaviour["stalled"] >= 1
    assert fast + slow == 41 and fast > 3 * slow, per
    assert elapsed < 5, elapsed
    assert not fetcher.content.bad_providers  # slow is not malicious
    scores = fetcher.content.scores
    assert scores[str(nodes[0].peer_id)]["chunks"] == per[str(nodes[0].peer_id)] > 0
    assert scores[str(nodes[3].peer_id)]["chunks"] == 0 and scores[str(nodes[0].peer_id)]["rate"] > 0
