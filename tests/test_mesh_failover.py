"""A stage server process is SIGKILLed mid-generation: the client re-routes and the text is unchanged."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import trio

torch = pytest.importorskip("torch")

from lattice import Node, NodeConfig  # noqa: E402
from lattice.apps.mesh_inference.client import MeshClient  # noqa: E402
from lattice.apps.mesh_inference.model import Stage, greedy_generate, random_weights, tiny_config  # noqa: E402
from lattice.testing.daemons import CLI, start_daemon  # noqa: E402

PROMPT = [11, 22, 33, 44]


def start_stages(tmp_path, ranges):
    """The first stage, then the others in parallel (each process spends seconds importing torch)."""

    def start(i, boot):
        a, b = ranges[i]
        args = ["--model", "tiny-random:0", "--blocks", f"{a}:{b}", "--listen", "/ip4/127.0.0.1/tcp/0",
                "--announce-interval", "2", "--threads", "1"]  # fmt: skip
        for addr in boot:
            args += ["--bootstrap", addr]
        return start_daemon(tmp_path, f"stage{i}", args, command="serve-model", timeout=60)

    first = start(0, [])
    with ThreadPoolExecutor(len(ranges)) as pool:
        rest = list(pool.map(lambda i: start(i, first.info["addrs"][:1]), range(1, len(ranges))))
    return [first, *rest]


@pytest.mark.slow  # four processes importing torch: ~20 s on a busy 2-core machine
async def test_killed_stage_is_replaced_and_the_text_is_unchanged(tmp_path):
    config = tiny_config()
    weights = random_weights(config, seed=0)
    expected = greedy_generate([Stage(config, weights, 0, 6)], PROMPT, 24)
    daemons = await trio.to_thread.run_sync(start_stages, tmp_path, [(0, 2), (2, 4), (2, 4), (4, 6)])
    try:
        cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / "client", control=False,
                         bootstrap=daemons[0].info["addrs"][:1])  # fmt: skip
        async with Node(cfg) as node:
            client = MeshClient(node, "tiny-random-0")
            with trio.fail_after(20):
                while len(await client.servers(fresh=True)) < 4:
                    await trio.sleep(0.1)
            tokens, step_times = [], []
            async with client.session() as session:
                by_peer = {d.peer_id: d for d in daemons}
                victim = by_peer[session.chain[1].server.peer]
                t = time.monotonic()
                async for token in session.generate(PROMPT, 24):
                    step_times.append(time.monotonic() - t)
                    tokens.append(token)
                    if len(tokens) == 8:
                        victim.stop(signal.SIGKILL)
                    t = time.monotonic()
            assert tokens == expected
            assert len(session.recoveries) == 1
            recovery = session.recoveries[0]
            assert recovery["blocks"] == (2, 4) and recovery["peers"] != [victim.peer_id]
            assert recovery["seconds"] < 2.0 and step_times[8] < 2.0
            assert victim.peer_id not in [h.server.peer for h in session.chain]
        # the CLI client, through the stages that are left
        argv = [*CLI, "generate", "--model", "tiny-random:0", "--tokens", ",".join(map(str, PROMPT)),
                "--max-new-tokens", "24", "--json", "--bootstrap", daemons[0].info["addrs"][0]]  # fmt: skip
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        result = json.loads(done.stdout.decode().strip().splitlines()[-1])
        assert result["tokens"] == expected and len(result["chain"]) == 3
    finally:
        for d in daemons:
            d.stop()


def test_serve_model_refuses_bad_arguments_in_one_line(tmp_path):
    for args, needle in (
        (["--model", "tiny-random:0", "--blocks", "4:9"], "the model has blocks 0:6"),
        (["--model", "tiny-random:0", "--blocks", "x"], "expected A:B"),
        (["--model", "tiny-random:0", "--blocks", "0:6", "--prefill-chunk", "10"], "prefill_chunk must be"),
        (["--model", str(tmp_path / "none.gguf")], "no model"),
    ):
        done = subprocess.run([*CLI, "serve-model", "--data-dir", str(tmp_path), *args], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert done.returncode == 2 and needle in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
