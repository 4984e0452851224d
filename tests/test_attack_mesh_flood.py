"""Hostile mesh-inference clients against a real stage-server process (issue 16, defect 7):
honest peers must still be served, and the server must stay alive and within its memory."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio

torch = pytest.importorskip("torch")

from attacks.mesh_flood import attacker_node, long_prompt, open_sessions, prefill_stall  # noqa: E402
from lattice.apps.mesh_inference.client import MeshClient  # noqa: E402
from lattice.apps.mesh_inference.model import Stage, greedy_generate, random_weights, tiny_config  # noqa: E402
from lattice.testing.daemons import start_daemon  # noqa: E402

MODEL = "tiny-random-0"
PROMPT = [11, 22, 33, 44]
MiB = 1 << 20


@pytest.fixture
def stage(tmp_path):
    """A `serve-model` process holding the whole tiny model (blocks 0:6), default limits."""
    args = ["--model", "tiny-random:0", "--blocks", "0:6", "--listen", "/ip4/127.0.0.1/tcp/0",
            "--announce-interval", "1", "--threads", "1"]  # fmt: skip
    daemon = start_daemon(tmp_path, "stage", args, command="serve-model", timeout=60)
    daemon.addr = daemon.info["addrs"][0]
    yield daemon
    daemon.stop()


def peak_rss(daemon) -> int:
    """The process's high-water mark of resident memory (VmHWM), bytes."""
    with open(f"/proc/{daemon.proc.pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def reference(prompt, n):
    config = tiny_config()
    return greedy_generate([Stage(config, random_weights(config, seed=0), 0, 6)], prompt, n)


async def generate(client: MeshClient, prompt: list[int], n: int = 8) -> list[int]:
    async with client.session() as session:
        return [t async for t in session.generate(prompt, n)]


async def honest_generate(tmp_path, stage, prompt=PROMPT, n=8) -> list[int]:
    """A new honest peer joins through the stage server, finds it in the DHT and generates."""
    async with attacker_node(tmp_path / "honest", [stage.addr]) as node:
        client = MeshClient(node, MODEL)
        await client.wait_for_chain(10)
        return await generate(client, prompt, n)


async def test_a_too_long_prompt_is_refused_before_compute_and_the_server_lives(tmp_path, stage):
    idle = peak_rss(stage)
    async with attacker_node(tmp_path / "attacker") as node:
        with trio.fail_after(30):
            result = await long_prompt(node, stage.addr, tokens=8192)
    assert result["request_bytes"] == 64 * 1024
    assert result["error"] == "RequestTooLarge", result
    assert "8192 positions" in result["message"] and "2048" in result["message"]
    assert result["seconds"] < 2.0
    assert stage.proc.poll() is None
    assert peak_rss(stage) - idle < 32 * MiB
    with trio.fail_after(20):
        assert await honest_generate(tmp_path, stage) == reference(PROMPT, 8)


async def test_a_max_context_prompt_runs_in_bounded_memory_and_bitwise_equal(tmp_path, stage):
    """2,048 tokens: unchunked, the scores alone were 2 x 64 MiB ([4, 2048, 2048] fp32) and the peak
    grew by 153 MiB; in chunks of 256 the step's live bytes are ~21 MiB (step_bytes), plus 3 MiB of
    KV cache: measured 27 MiB."""
    config = tiny_config()
    prompt = torch.randint(0, config.vocab_size, (2048,), generator=torch.Generator().manual_seed(3)).tolist()
    async with attacker_node(tmp_path / "honest", [stage.addr]) as node:
        client = MeshClient(node, MODEL)
        await client.wait_for_chain(10)
        idle = peak_rss(stage)
        async with client.session() as session:
            with trio.fail_after(60):
                logits = await session.forward(prompt)
    grown = peak_rss(stage) - idle
    single = Stage(config, random_weights(config, seed=0), 0, 6).forward(torch.tensor([prompt]))
    assert torch.equal(logits, single[0, -1])  # chunked on the server, unchunked here
    assert grown < 40 * MiB, f"peak RSS grew by {grown / MiB:.1f} MiB"


async def test_a_peer_at_its_session_cap_cannot_lock_out_honest_peers(tmp_path, stage):
    async with AsyncExitStack() as stack:
        node = await stack.enter_async_context(attacker_node(tmp_path / "honest", [stage.addr]))
        honest = MeshClient(node, MODEL)
        await honest.wait_for_chain(10)
        attacker = await stack.enter_async_context(attacker_node(tmp_path / "attacker"))
        flood = await open_sessions(attacker, stage.addr, count=16)
        assert flood["opened"] == 4 and flood["errors"] == {"ServerBusy": 12}, flood
        with trio.fail_after(20):
            assert await generate(honest, PROMPT) == reference(PROMPT, 8)
        # sybils: three more identities fill the server (16 sessions, all fresh, none idle) ...
        for i in range(3):
            sybil = await stack.enter_async_context(attacker_node(tmp_path / f"sybil{i}"))
            assert (await open_sessions(sybil, stage.addr, count=4))["opened"] == 4
        # ... and an honest session still opens: the biggest holder gives one up
        with trio.fail_after(20):
            assert await generate(honest, [5, 6, 7]) == reference([5, 6, 7], 8)
        info = await attacker.rpc.call(await attacker.connect(stage.addr), "mesh.info", None, timeout=5)
    assert info["stats"]["evicted"] >= 1
    assert stage.proc.poll() is None


async def test_a_long_prefill_does_not_stall_another_sessions_first_token(tmp_path, stage):
    """A probe waits for at most the chunk being computed (the compute lock hands over in FIFO order
    between chunks). Bound: alone + 2 average chunks (a 2,048-token prefill is 8 chunks of 256; the
    last chunk attends to 2,048 positions and costs up to ~1.8x the average) + 0.1 s of RPC and
    thread-hop jitter on a busy machine. Unchunked, the probe waited for the whole prefill."""
    async with attacker_node(tmp_path / "attacker") as a, attacker_node(tmp_path / "honest") as h:
        with trio.fail_after(60):
            r = await prefill_stall(a, h, stage.addr, prompt_tokens=2048)
    assert r["prefill_error"] is None and r["probe_error"] is None, r
    chunk_s = r["prefill_s"] / 8
    assert r["ttft_during_s"] <= r["ttft_alone_s"] + 2 * chunk_s + 0.1, r
    assert r["decode_during_s"] <= r["decode_alone_s"] + 2 * chunk_s + 0.1, r
