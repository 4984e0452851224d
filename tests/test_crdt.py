"""Replicated documents between real nodes over loopback: push, anti-entropy, late joiners, rogues."""

from __future__ import annotations

import pytest
import trio

from lattice import Node, NodeConfig
from lattice.crdt import AccessDenied, sign
from lattice.identity import KeyPair


@pytest.fixture
async def trio_nodes(tmp_path, nursery):
    """Three connected nodes (the second and third bootstrap from the first)."""
    nodes: list[Node] = []
    ready = trio.Event()

    async def run():
        from contextlib import AsyncExitStack

        async with AsyncExitStack() as stack:
            first = await stack.enter_async_context(
                Node(NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / "n0", control=False))
            )
            nodes.append(first)
            for i in (1, 2):
                cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / f"n{i}", control=False,
                                 bootstrap=[first.addrs[0]])  # fmt: skip
                nodes.append(await stack.enter_async_context(Node(cfg)))
            ready.set()
            await trio.sleep_forever()

    nursery.start_soon(run)
    await ready.wait()
    return nodes


async def wait_equal(docs, timeout=10.0):
    with trio.fail_after(timeout):
        while len({repr(sorted(d.get_map("root").to_py().items())) for d in docs}) != 1:
            await trio.sleep(0.02)


async def test_writes_reach_every_peer_and_converge(trio_nodes):
    docs = [n.crdt.open("swarm/config") for n in trio_nodes]
    with trio.fail_after(10):
        while any(len(n.crdt._peers()) < 1 for n in trio_nodes):
            await trio.sleep(0.02)
    for i, doc in enumerate(docs):
        for j in range(20):
            doc.get_map("root")[f"k{i}-{j}"] = j
    docs[0].get_map("root")["shared"] = "from a"
    docs[1].get_map("root")["shared"] = "from b"
    await wait_equal(docs)
    state = docs[2].get_map("root").to_py()
    assert len(state) == 61 and state["shared"] in ("from a", "from b")


async def test_a_late_opener_catches_up_by_anti_entropy(trio_nodes):
    a, b, _c = trio_nodes
    doc_a = a.crdt.open("models")
    for j in range(50):
        doc_a.get_map("root")[f"m{j}"] = {"step": j}
    doc_b = b.crdt.open("models")  # opened after the writes: nothing was pushed to it
    await wait_equal([doc_a, doc_b])
    assert doc_b.get_map("root").to_py()["m49"] == {"step": 49}


async def test_forged_and_unauthorized_updates_change_nothing(trio_nodes):
    a, b, _c = trio_nodes
    owner = a.host.peer_id
    doc_a = a.crdt.open("owned", writers={owner})
    doc_b = b.crdt.open("owned", writers={owner})
    doc_a.get_map("root")["x"] = 1
    await wait_equal([doc_a, doc_b])
    # b is not a writer: its local write is refused before anything leaves b
    with pytest.raises(BaseExceptionGroup) as refused:  # pycrdt wraps errors raised in its observers
        doc_b.get_map("root")["x"] = 2
    assert refused.group_contains(AccessDenied)
    # a rogue signs an update for the document with its own key: rejected on apply
    rogue = KeyPair.generate()
    scratch = a.crdt.open("scratch")
    scratch.get_map("root")["x"] = 3
    data = scratch.get_update(owner, 1).data
    assert not doc_b.apply(sign(rogue, "owned", 1, data))
    assert doc_b.stats.rejected_access >= 1
    await trio.sleep(0.3)
    assert a.crdt.open("owned").get_map("root").to_py() == {"x": 1.0}
