"""Mesh inference from the content store: stage servers that start with nothing but a packed
model's content id fetch only the chunks of their blocks from a seeding peer, and compute bitwise
what servers with the local weights compute (real `lattice-node` daemons, tiny random model)."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import trio

torch = pytest.importorskip("torch")

from lattice import Node, NodeConfig  # noqa: E402
from lattice.apps.mesh_inference import machine  # noqa: E402
from lattice.apps.mesh_inference.client import MeshClient  # noqa: E402
from lattice.apps.mesh_inference.model import Stage, greedy_generate, random_weights, tiny_config  # noqa: E402
from lattice.apps.mesh_inference.tokenizer import byte_tokenizer  # noqa: E402
from lattice.apps.mesh_inference.weights import config_from_json, open_model, pack_model  # noqa: E402
from lattice.content.manifest import safetensors_layout  # noqa: E402
from lattice.errors import ConfigError  # noqa: E402
from lattice.testing.daemons import CLI, start_daemon  # noqa: E402

CONFIG = tiny_config()
RANGES = [(0, 2), (2, 4), (4, 6)]
PROMPT = [3, 14, 15, 92, 65]
CHUNK = 16 << 10  # ~60 chunks for the tiny model (1 MiB chunks would put it all in one)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as the servers (--threads 1): same sums


def _chunks(start: int, end: int) -> set[int]:
    return set(range(start // CHUNK, (end - 1) // CHUNK + 1)) if end > start else set()


def _needed(path, start: int, end: int) -> set[int]:
    """The chunks a server of blocks [start, end) needs: the file's header (config) and its tensors."""
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    entries = {t.name: t for t in safetensors_layout(data[:header], len(data))}
    need = _chunks(0, header)
    for name in CONFIG.stage_tensor_names(start, end):
        need |= _chunks(entries[name].start, entries[name].end)
    return need


async def _logits(boot: str, model_id: str, tmp_path) -> torch.Tensor:
    cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / "probe", control=False,
                     bootstrap=[boot])  # fmt: skip
    async with Node(cfg) as node:
        client = MeshClient(node, model_id)
        await client.wait_for_chain(20)
        async with client.session() as session:
            assert [(h.start, h.end) for h in session.chain] == RANGES
            return await session.forward(PROMPT, logits="all")


def test_stage_servers_fetch_only_their_blocks_of_a_packed_model_and_compute_bitwise_the_same(
    tmp_path, monkeypatch
):
    monkeypatch.setenv(machine.ENV_DIR, str(tmp_path / "mesh-servers"))  # other engineers' servers
    package = pack_model(open_model("tiny-random:0"), tmp_path / "tiny.safetensors")
    seed = start_daemon(tmp_path, "seed", ["--listen", "/ip4/127.0.0.1/tcp/0"])
    servers = []
    try:
        with seed.client() as c:
            cid = c.content.add(package, chunk_size=CHUNK)["cid"]
        boot = seed.info["addrs"][0]

        def serve(blocks: tuple[int, int]):
            args = ["--model", cid, "--blocks", f"{blocks[0]}:{blocks[1]}", "--bootstrap", boot,
                    "--threads", "1", "--listen", "/ip4/127.0.0.1/tcp/0",
                    "--announce-interval", "2"]  # fmt: skip
            return start_daemon(tmp_path, f"s{blocks[0]}", args, command="serve-model", timeout=90)

        with ThreadPoolExecutor(3) as pool:
            servers = list(pool.map(serve, RANGES))
        total = -(-package.stat().st_size // CHUNK)
        for server, (start, end) in zip(servers, RANGES, strict=True):
            with server.client() as c:
                (row,) = [r for r in c.content.status()["objects"] if r["cid"] == cid]
            assert row["have_chunks"] == len(_needed(package, start, end)) < total, row

        weights = random_weights(CONFIG, seed=0)  # the local-file case: the weights themselves
        single = Stage(CONFIG, weights, 0, CONFIG.n_layers).forward(torch.tensor([PROMPT]))
        assert torch.equal(trio.run(_logits, boot, cid, tmp_path), single[0])

        argv = [*CLI, "generate", "--model", cid, "--tokens", ",".join(map(str, PROMPT)), "--bootstrap", boot,
                "--json", "--max-new-tokens", "8"]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        stages = [Stage(CONFIG, weights, a, b) for a, b in RANGES]
        assert json.loads(done.stdout)["tokens"] == greedy_generate(stages, PROMPT, 8)
        # a text prompt: the tokenizer the file carries, published by the servers in the model card
        argv = [
            *CLI,
            "generate",
            "--model",
            cid,
            "hi there",
            "--bootstrap",
            boot,
            "--json",
            "--max-new-tokens",
            "4",
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        text_prompt = byte_tokenizer().encode("hi there").ids
        assert json.loads(done.stdout)["tokens"] == greedy_generate(stages, text_prompt, 4)
    finally:
        for daemon in [seed, *servers]:
            daemon.stop()


def test_a_packed_models_config_is_checked_before_anything_is_built_from_it():
    good = json.dumps(CONFIG.as_dict())
    assert config_from_json(good) == CONFIG
    for bad in ("[]", "{", json.dumps({**CONFIG.as_dict(), "n_layers": 10**6}),
                json.dumps({**CONFIG.as_dict(), "max_positions": 1 << 30}),
                json.dumps({**CONFIG.as_dict(), "hidden": "64"}), json.dumps({**CONFIG.as_dict(), "evil": 1}),
                json.dumps({**CONFIG.as_dict(), "n_kv_heads": 3})):  # fmt: skip
        with pytest.raises(ConfigError):
            config_from_json(bad)


def test_a_stage_server_refuses_a_packed_model_with_a_hostile_config_and_the_seed_still_serves(tmp_path):
    """Whoever made the file chose its config: a billion layers (a RoPE table or a layer list built
    from it would exhaust memory) ends `serve-model` with one line naming the field, before any
    weight is fetched; the seed keeps serving an honest server of a good model."""
    from safetensors.numpy import save_file

    config = {**CONFIG.as_dict(), "n_layers": 10**9}
    meta = {"format": "lattice-llama/1", "model": "evil", "config": json.dumps(config)}
    evil = tmp_path / "evil.safetensors"
    save_file({"token_embd.weight": np.zeros((4, 4), np.float32)}, str(evil), metadata=meta)
    good = pack_model(open_model("tiny-random:0"), tmp_path / "tiny.safetensors")
    seed = start_daemon(tmp_path, "seed", ["--listen", "/ip4/127.0.0.1/tcp/0"])
    honest = None
    try:
        with seed.client() as c:
            evil_cid, good_cid = (c.content.add(p, chunk_size=CHUNK)["cid"] for p in (evil, good))
        boot = seed.info["addrs"][0]
        common = ["--blocks", "0:6", "--bootstrap", boot, "--listen", "/ip4/127.0.0.1/tcp/0"]
        argv = [*CLI, "serve-model", "--model", evil_cid, "--data-dir", str(tmp_path / "victim"), *common]
        (tmp_path / "victim").mkdir(mode=0o700)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0
        assert "bad n_layers" in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
        with seed.client() as c:
            (row,) = [r for r in c.content.status()["objects"] if r["cid"] == evil_cid]
            assert row["state"] == "complete"  # the seed is unharmed
        args = ["--model", good_cid, "--threads", "1", *common]
        honest = start_daemon(tmp_path, "honest", args, command="serve-model", timeout=90)
        assert honest.info["blocks"] == [0, 6]
    finally:
        for daemon in (seed, honest):
            if daemon is not None:
                daemon.stop()


async def test_a_packed_gguf_model_brings_its_config_tokenizer_and_weights(tmp_path, nursery):
    """What a server or `generate` takes from a packed model's file: the GGUF's config, a tokenizer
    that encodes as the GGUF's does, and a stage's tensors equal to the GGUF's (in-process nodes)."""
    from lattice.apps.mesh_inference.weights import ContentModel
    from test_content_fetch import start_nodes
    from test_mesh_gguf import CONFIG as GGUF_CONFIG
    from test_mesh_gguf import write_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(path, random_weights(GGUF_CONFIG, seed=5))
    local = open_model(str(path))
    package = pack_model(local, tmp_path / "tiny.safetensors")
    a, b = await start_nodes(tmp_path, nursery, 2)
    cid = str(await a.content.add(package, chunk_size=CHUNK))
    remote = ContentModel(cid)
    assert await remote.open(b.content) == local.config  # (its norm_eps as the GGUF stores it: float32)
    assert local.config.n_layers == GGUF_CONFIG.n_layers
    text = "ab cab 12<|im_end|>"
    assert remote.tokenizer().encode(text).ids == local.tokenizer().encode(text).ids
    got = await remote.load(b.content, 2, 4)
    want = local.load(2, 4, None)
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)
    (row,) = [r for r in b.content.store.listing() if r["cid"] == cid]
    assert row["have_chunks"] < row["chunks"]  # only the header and blocks 2-3
