"""Mesh inference over real nodes on loopback (embedded in the test process), tiny random model."""

from __future__ import annotations

import pytest
import trio

torch = pytest.importorskip("torch")

from lattice import Node, NodeConfig  # noqa: E402
from lattice.apps.mesh_inference.client import MeshClient  # noqa: E402
from lattice.apps.mesh_inference.errors import MeshError, NoChainError  # noqa: E402
from lattice.apps.mesh_inference.model import (  # noqa: E402
    Stage,
    generate_local,
    greedy_generate,
    random_weights,
    tiny_config,
)
from lattice.apps.mesh_inference.sampling import Sampling  # noqa: E402
from lattice.apps.mesh_inference.server import ServerLimits, StageServer, pick_victim, plan_batch  # noqa: E402
from lattice.apps.mesh_inference.tokenizer import byte_tokenizer  # noqa: E402
from lattice.content import Content  # noqa: E402
from lattice.dht.service import DHT, DHTConfig  # noqa: E402
from lattice.rpc import RPC  # noqa: E402

CONFIG = tiny_config()
WEIGHTS = random_weights(CONFIG, seed=0)
MODEL = "tiny-random-0"
PROMPT = [3, 14, 15, 92, 65]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference(prompt, n):
    return greedy_generate([Stage(CONFIG, WEIGHTS, 0, CONFIG.n_layers)], prompt, n)


async def _run_node(cfg, services, apps=(), task_status=trio.TASK_STATUS_IGNORED):
    with trio.CancelScope() as scope:
        async with Node(cfg, services=services, apps=list(apps)) as node:
            task_status.started((node, scope))
            await trio.sleep_forever()


@pytest.fixture
async def mesh(tmp_path, nursery):
    """``await mesh([(0, 2), (2, 6)], limits=...)`` -> (client node, {range: [StageServer]}).
    ``server.kill()`` stops a server's node at once (its connections drop)."""

    async def start(ranges, limits=None, card=False):
        """``card``: servers publish the tiny model's tokenizer (nodes run the content service)."""
        servers: dict = {}
        boot: list[str] = []
        for i, (a, b) in enumerate(ranges):
            tokenizer = byte_tokenizer() if card else None
            server = StageServer(Stage(CONFIG, WEIGHTS, a, b), MODEL, (limits or {}).get((a, b)),
                                 announce_interval=2.0, tokenizer=tokenizer)  # fmt: skip
            cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / f"s{i}", control=False,
                             bootstrap=boot[:1])  # fmt: skip
            node, scope = await nursery.start(_run_node, cfg, services(card), [server])
            server.kill = scope.cancel
            boot = boot or node.addrs
            servers.setdefault((a, b), []).append(server)
        cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / "client", control=False,
                         bootstrap=boot[:1])  # fmt: skip
        client, _ = await nursery.start(_run_node, cfg, services(card))
        with trio.fail_after(20):
            for group in servers.values():
                for s in group:
                    await s.ready.wait()
        return client, servers

    return start


def services(content: bool) -> list:
    return [RPC(), DHT(DHTConfig(persist=False)), *([Content()] if content else [])]


async def wait_servers(client: MeshClient, count: int) -> None:
    with trio.fail_after(10):
        while len(await client.servers(fresh=True)) < count:
            await trio.sleep(0.05)


async def generate(client, prompt, n, sampling=None):
    async with client.session() as session:
        tokens = [t async for t in session.generate(prompt, n, sampling=sampling)]
    return tokens, session


async def test_three_stages_give_bitwise_logits_and_the_same_tokens(mesh):
    node, _servers = await mesh([(0, 2), (2, 4), (4, 6)])
    client = MeshClient(node, MODEL)
    await wait_servers(client, 3)
    chain = await client.find_chain()
    assert [(h.start, h.end) for h in chain] == [(0, 2), (2, 4), (4, 6)]
    single = Stage(CONFIG, WEIGHTS, 0, 6).forward(torch.tensor([PROMPT]))
    async with client.session() as session:
        logits = await session.forward(PROMPT, logits="all")
    assert torch.equal(logits, single[0])
    tokens, _ = await generate(client, PROMPT, 12)
    assert tokens == reference(PROMPT, 12)


async def test_concurrent_sessions_are_independent(mesh):
    node, servers = await mesh([(0, 3), (3, 6)])
    client = MeshClient(node, MODEL)
    await wait_servers(client, 2)
    prompts = [[1, 2, 3], [9, 8, 7, 6], [42], [5, 5, 5, 5, 5]]
    results: dict[int, list[int]] = {}

    async def one(i):
        results[i], _ = await generate(client, prompts[i], 10)

    async with trio.open_nursery() as n:
        for i in range(len(prompts)):
            n.start_soon(one, i)
    for i, p in enumerate(prompts):
        assert results[i] == reference(p, 10)
    assert servers[(0, 3)][0].stats["forwards"] >= 40
    with trio.fail_after(5):  # sessions are closed when they end
        while servers[(0, 3)][0]._sessions:
            await trio.sleep(0.02)


async def test_no_chain_names_the_missing_blocks(mesh):
    node, _ = await mesh([(0, 2), (4, 6)])
    client = MeshClient(node, MODEL)
    await wait_servers(client, 2)
    with pytest.raises(NoChainError, match="2:4") as err:
        await client.find_chain()
    assert err.value.missing == [(2, 4)]
    with pytest.raises(NoChainError, match="no stage server announces no-such-model"):
        await MeshClient(node, "no-such-model").find_chain()


async def test_a_full_server_refuses_and_the_client_routes_around_it(mesh):
    limits = {(0, 6): ServerLimits(max_sessions=1)}
    node, servers = await mesh([(0, 6), (0, 3), (3, 6)], limits)
    client = MeshClient(node, MODEL)
    await wait_servers(client, 3)
    whole = servers[(0, 6)][0]
    async with client.session() as first:
        assert [(h.start, h.end) for h in first.chain] == [(0, 6)]  # fewest hops
        await first.forward(PROMPT)
        tokens, second = await generate(client, [7, 7], 6)  # the whole-model server is full now
        assert tokens == reference([7, 7], 6)
        assert [(h.start, h.end) for h in second.chain] == [(0, 3), (3, 6)]
        assert whole.stats["refused"] >= 1


async def test_cache_budget_is_enforced_with_a_clear_error(mesh):
    per_token = CONFIG.kv_bytes_per_token(6)
    node, servers = await mesh([(0, 6)], {(0, 6): ServerLimits(cache_bytes=per_token * 8)})
    client = MeshClient(node, MODEL, recover_timeout=1.0)
    await wait_servers(client, 1)
    async with client.session() as session:
        await session.forward([1, 2, 3, 4, 5, 6])
        with pytest.raises(MeshError) as err:
            await session.forward([1, 2, 3])  # 9 tokens > budget of 8, and nobody else serves 0:6
    assert "0:6" in str(err.value)
    assert servers[(0, 6)][0].stats["refused"] == 1


async def test_an_expired_session_is_replayed_on_the_same_server(mesh):
    node, servers = await mesh([(0, 3), (3, 6)], {(3, 6): ServerLimits(session_ttl=0.2)})
    client = MeshClient(node, MODEL)
    await wait_servers(client, 2)
    async with client.session() as session:
        tokens = [t async for t in _slow(session.generate(PROMPT, 6))]
    assert tokens == reference(PROMPT, 6)
    assert servers[(3, 6)][0].stats["expired"] >= 1 and session.recoveries
    assert all(r["peers"] == [str(servers[(3, 6)][0].node.peer_id)] for r in session.recoveries)


async def _slow(tokens):
    async for t in tokens:
        yield t
        await trio.sleep(0.35)  # longer than the session TTL: the server drops the cache


@pytest.mark.parametrize("hop", [0, 1, 2])  # first (token ids), middle, last (logits) stage
async def test_a_stage_that_dies_mid_generation_is_replaced_and_the_text_is_unchanged(mesh, hop):
    node, servers = await mesh([(0, 2), (2, 4), (4, 6), (0, 2), (2, 4), (4, 6)])
    client = MeshClient(node, MODEL)
    await wait_servers(client, 6)
    by_peer = {str(s.node.peer_id): s for group in servers.values() for s in group}
    tokens = []
    async with client.session() as session:
        victim = by_peer[session.chain[hop].server.peer]
        async for token in session.generate(PROMPT, 20):
            tokens.append(token)
            if len(tokens) == 6:
                victim.kill()
    assert tokens == reference(PROMPT, 20)
    assert len(session.recoveries) == 1 and session.recoveries[0]["seconds"] < 2.0
    assert session.recoveries[0]["peers"] != [str(victim.node.peer_id)]
    replacement = by_peer[session.recoveries[0]["peers"][0]]
    assert replacement.stats["replays"] == 1


async def test_a_dead_stage_can_be_replaced_by_two_smaller_ones(mesh):
    node, servers = await mesh([(0, 2), (2, 4), (2, 3), (3, 4), (4, 6)])
    client = MeshClient(node, MODEL)
    await wait_servers(client, 5)
    tokens = []
    async with client.session() as session:
        assert [(h.start, h.end) for h in session.chain] == [(0, 2), (2, 4), (4, 6)]
        async for token in session.generate(PROMPT, 12):
            tokens.append(token)
            if len(tokens) == 5:
                servers[(2, 4)][0].kill()
        assert [(h.start, h.end) for h in session.chain] == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert tokens == reference(PROMPT, 12)
    assert servers[(2, 3)][0].stats["replays"] == 1 and servers[(3, 4)][0].stats["replays"] == 1


async def test_no_replacement_gives_no_chain_error_in_bounded_time(mesh):
    node, servers = await mesh([(0, 2), (2, 4), (4, 6)])
    client = MeshClient(node, MODEL, recover_timeout=1.0)
    await wait_servers(client, 3)
    async with client.session() as session:
        await session.forward(PROMPT)
        servers[(2, 4)][0].kill()
        with trio.fail_after(5), pytest.raises(NoChainError, match="2:4"):
            await session.forward([1])


async def test_bad_requests_are_refused_before_any_compute(mesh):
    from lattice.rpc import RemoteError

    node, servers = await mesh([(0, 3), (3, 6)])
    server = servers[(3, 6)][0]
    peer = str(server.node.peer_id)
    await node.connect(server.node.addrs[0])
    base = {"session": "s", "start": 3, "end": 6, "pos": 0}
    bad = [
        {**base, "inputs": [torch.zeros(1, 2, 7)]},  # wrong hidden size
        {**base, "inputs": [torch.zeros(1, 2, CONFIG.hidden, dtype=torch.float64)]},
        {**base, "start": 0, "inputs": [torch.zeros(1, 2, CONFIG.hidden)]},  # blocks not served
        {**base, "pos": 5, "inputs": [torch.zeros(1, 1, CONFIG.hidden)]},  # no such session
        {**base, "session": "x" * 65, "inputs": [torch.zeros(1, 1, CONFIG.hidden)]},
        {**base, "inputs": []},
        {**base, "inputs": [[[0.0] * CONFIG.hidden]]},  # a list, not a tensor
        "not a map",
    ]
    for payload in bad:
        with pytest.raises(RemoteError):
            await node.rpc.call(peer, "mesh.forward", payload, timeout=5)
    assert server.stats["forwards"] == 0


async def test_a_prompt_computed_in_chunks_across_stages_is_bitwise_equal_to_one_piece(mesh):
    small = ServerLimits(prefill_chunk=64)
    node, servers = await mesh([(0, 3), (3, 6)], {(0, 3): small, (3, 6): small})
    client = MeshClient(node, MODEL)
    await wait_servers(client, 2)
    prompt = torch.randint(0, CONFIG.vocab_size, (300,), generator=torch.Generator().manual_seed(9)).tolist()
    single = Stage(CONFIG, WEIGHTS, 0, 6).forward(torch.tensor([prompt]))  # unchunked
    async with client.session() as session:
        assert torch.equal(await session.forward(prompt, logits="all"), single[0])
    assert servers[(0, 3)][0].stats["steps"] == 5  # 300 positions: 5 chunks of 60
    tokens, _ = await generate(client, prompt, 6)
    assert tokens == reference(prompt, 6)


async def test_calls_over_the_context_or_reply_limit_are_refused_before_any_compute(mesh):
    from lattice.rpc import RemoteError

    limits = ServerLimits(max_context=64, max_reply_bytes=10 * CONFIG.vocab_size * 4)
    node, servers = await mesh([(0, 6)], {(0, 6): limits})
    server = servers[(0, 6)][0]
    peer = await node.connect(server.node.addrs[0])
    base = {"session": "s", "start": 0, "end": 6, "pos": 0, "want": "last", "logits": "last"}
    for payload, needle in (
        ({**base, "inputs": [torch.zeros(1, 65, dtype=torch.int64)]}, "65 positions; this server allows 64"),
        ({**base, "inputs": [torch.zeros(1, 11, dtype=torch.int64)], "logits": "all"}, "reply would be"),
    ):
        with pytest.raises(RemoteError, match=needle) as err:
            await node.rpc.call(peer, "mesh.forward", payload, timeout=5)
        assert err.value.type == "RequestTooLarge"
    assert server.stats["steps"] == 0 and not server.session_ids()
    # at the limit: served
    payload = {**base, "inputs": [torch.zeros(1, 64, dtype=torch.int64)]}
    reply = await node.rpc.call(peer, "mesh.forward", payload, timeout=5, as_torch=True)
    assert reply["outputs"][0].shape == (1, 1, CONFIG.vocab_size)


async def test_a_peer_at_its_cap_gets_a_new_session_for_its_idle_one(mesh):
    from lattice.rpc import RemoteError

    limits = ServerLimits(max_sessions_per_peer=2, pressure_ttl=0.3)
    node, servers = await mesh([(0, 6)], {(0, 6): limits})
    server = servers[(0, 6)][0]
    peer = await node.connect(server.node.addrs[0])

    async def open_session(name):
        payload = {"session": name, "start": 0, "end": 6, "pos": 0, "inputs": [torch.tensor([[1]])]}
        return await node.rpc.call(peer, "mesh.forward", payload, timeout=5)

    await open_session("a")
    await open_session("b")
    with pytest.raises(RemoteError, match="holds 2 of the 2 sessions a peer may have"):
        await open_session("c")
    await trio.sleep(0.35)  # a and b are idle now: under pressure the oldest goes
    await open_session("c")
    assert sorted(s for _, s in server.session_ids()) == ["b", "c"] and server.stats["evicted"] == 1


def test_a_full_server_gives_up_an_idle_session_or_one_of_the_biggest_holders():
    now = 100.0
    rows = [(("a", i), "a", now - 0.1 * (i + 1), False) for i in range(3)]
    rows.append((("b", 0), "b", now - 1.0, False))
    assert pick_victim(rows, "c", now, idle=2.0) == ("a", 2)  # a holds 3 >= 0 + 2: its least recent
    assert pick_victim(rows, "b", now, idle=2.0) == ("a", 2)  # 3 >= 1 + 2
    assert pick_victim(rows, "a", now, idle=2.0) is None  # nobody holds more than a
    assert pick_victim(rows, "a", now, idle=0.5) == ("b", 0)  # idle ones first, whoever holds them
    busy = [(k, p, t, True) if p == "a" else (k, p, t, b) for k, p, t, b in rows]
    assert pick_victim(busy, "c", now, idle=2.0) is None  # a step in flight: never taken
    even = [(("a", 0), "a", now, False), (("b", 0), "b", now, False)]
    assert pick_victim(even, "c", now, idle=2.0) is None  # one each: fair already


async def test_sessions_share_steps_and_each_gets_its_single_process_tokens(mesh):
    """Continuous batching: concurrent sessions' steps run as one forward on each server, and every
    session's tokens, greedy or sampled with a seed, are those of one process."""
    limits = ServerLimits(max_sessions_per_peer=16)
    node, servers = await mesh([(0, 3), (3, 6)], {(0, 3): limits, (3, 6): limits})
    client = MeshClient(node, MODEL)
    await wait_servers(client, 2)
    jobs = [([i + 1, 2 * i + 3, 7], Sampling(temperature=0.9, top_p=0.95, seed=i) if i % 2 else None)
            for i in range(8)]  # fmt: skip
    results: dict[int, list[int]] = {}

    async def one(i):
        results[i], _ = await generate(client, jobs[i][0], 12, jobs[i][1])

    async with trio.open_nursery() as n:
        for i in range(len(jobs)):
            n.start_soon(one, i)
    stage = Stage(CONFIG, WEIGHTS, 0, 6)
    for i, (prompt, sampling) in enumerate(jobs):
        assert results[i] == generate_local([stage], prompt, 12, sampling), i
    assert results[1] != reference(jobs[1][0], 12)  # sampled, not greedy
    for a, b in ((0, 3), (3, 6)):
        stats = servers[(a, b)][0].stats
        assert stats["max_batch"] >= 4 and stats["batched"] > 1.5 * stats["steps"], stats


def test_a_batch_is_the_oldest_step_and_later_ones_for_the_same_blocks_within_the_bounds():
    steps = [((0, 3), 1), ((0, 3), 64), ((1, 3), 1), ((0, 3), 1), ((0, 3), 1), ((0, 3), 1)]
    assert plan_batch(steps, max_batch=16, max_rows=256) == [0, 1, 3, 4, 5]
    assert plan_batch(steps, max_batch=3, max_rows=256) == [0, 1, 3]
    assert plan_batch(steps, max_batch=16, max_rows=3) == [0, 3, 4]  # the prompt chunk waits
    assert plan_batch(steps[2:], max_batch=16, max_rows=256) == [0]  # other blocks: alone
    assert plan_batch(steps, max_batch=1, max_rows=256) == [0]  # no batching
    assert plan_batch([], 4, 4) == []


async def test_a_thin_client_gets_config_and_tokenizer_from_the_servers(mesh):
    node, _servers = await mesh([(0, 3), (3, 6)], card=True)
    client = MeshClient(node, MODEL)
    await wait_servers(client, 2)
    card = await client.model_card()
    assert card.config == CONFIG and card.model_id == MODEL and card.chat == "plain"
    assert card.tokenizer and card.tokenizer_bytes > 1000
    tokenizer = await client.tokenizer()  # through the content layer, by the id in the card
    ids = tokenizer.encode("Hi there").ids
    assert ids == list(b"Hi there") and tokenizer.decode(ids) == "Hi there"
    assert node.content.counters["bytes_fetched"] == card.tokenizer_bytes
    tokens, _ = await generate(client, ids, 8)
    assert tokens == reference(ids, 8)


async def test_content_get_refuses_content_over_max_size_before_fetching_it(mesh):
    from lattice.content import ContentError

    node, servers = await mesh([(0, 6)], card=True)
    server_node = servers[(0, 6)][0].node
    cid = await server_node.content.add(b"x" * 300_000)
    with pytest.raises(ContentError, match="300000 bytes, more than the 1000"):
        await node.content.get(cid, providers=[server_node.addrs[0]], max_size=1000)
    assert node.content.counters["bytes_fetched"] == 0
    path = await node.content.get(cid, providers=[server_node.addrs[0]], max_size=300_000)
    assert path.stat().st_size == 300_000
