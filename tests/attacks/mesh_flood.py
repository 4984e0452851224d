"""Hostile mesh-inference clients (issue 16, defect 7), each against a real stage server.

Every function takes a node to act from (``attacker_node`` makes one) and the victim stage
server's multiaddr (ending in ``/p2p/<peer id>``), and returns a dict of what happened, so the
same code runs in tests/test_attack_mesh_flood.py and in bench/attack.py.

- ``long_prompt``: one prompt longer than a session may be (8,192 token ids are a 64 KiB request;
  the unfixed server built [heads, T, T] fp32 attention scores for it: 1 GiB per head group).
- ``open_sessions``: one-token sessions that are never closed (the unfixed server let one peer
  hold all 16 and refused everyone else for the 300 s TTL).
- ``prefill_stall``: another session's time to first token while a long prompt is prefilled (the
  unfixed server ran the whole prompt under its compute lock: 0.14 s became 13 s).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
import trio

from lattice import Node, NodeConfig
from lattice.rpc import RemoteError, RPCError


@asynccontextmanager
async def attacker_node(data_dir: Path, bootstrap: Sequence[str] = ()) -> AsyncIterator[Any]:
    """A fresh identity on loopback (one more peer id: sybils are this, called again)."""
    cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=data_dir, control=False,
                     bootstrap=list(bootstrap))  # fmt: skip
    async with Node(cfg) as node:
        yield node


async def server_info(node: Any, victim: str) -> tuple[str, dict]:
    """(peer id, mesh.info) of the victim."""
    peer = await node.connect(victim)
    return peer, await node.rpc.call(peer, "mesh.info", None, timeout=10.0)


def _inputs(info: dict, tokens: int, seed: int = 0) -> torch.Tensor:
    """What the victim's first served block takes: token ids, or hidden states of a later stage."""
    config = info["config"]
    gen = torch.Generator().manual_seed(seed)
    if info["start"] == 0:
        return torch.randint(0, config["vocab_size"], (1, tokens), generator=gen, dtype=torch.int64)
    return torch.randn(1, tokens, config["hidden"], generator=gen)


async def _forward(
    node: Any, peer: str, info: dict, session: str, x: torch.Tensor, timeout: float, pos: int = 0
) -> dict:
    """One mesh.forward (pos 0 opens ``session``); {"ok", "error", "message", "seconds"}."""
    payload = {"session": session, "start": info["start"], "end": info["end"], "pos": pos, "inputs": [x],
               "want": "last", "logits": "last"}  # fmt: skip
    t0 = time.monotonic()
    out: dict = {"ok": False, "error": None, "message": ""}
    try:
        await node.rpc.call(peer, "mesh.forward", payload, timeout=timeout, as_torch=True)
        out["ok"] = True
    except RemoteError as exc:
        out["error"], out["message"] = exc.type, exc.remote_message
    except (RPCError, trio.TooSlowError, OSError) as exc:
        out["error"], out["message"] = type(exc).__name__, str(exc)
    out["seconds"] = round(time.monotonic() - t0, 4)
    return out


async def long_prompt(node: Any, victim: str, tokens: int = 8192, timeout: float = 120.0) -> dict:
    """Send one ``tokens``-long prompt in one call; did the server refuse it, and how fast?"""
    peer, info = await server_info(node, victim)
    x = _inputs(info, tokens)
    result = await _forward(node, peer, info, "long-" + secrets.token_hex(4), x, timeout)
    return {"attack": "mesh_long_prompt", "tokens": tokens, "request_bytes": x.nbytes,
            "refused": result["error"] is not None, **result}  # fmt: skip


async def open_sessions(node: Any, victim: str, count: int = 16, timeout: float = 10.0) -> dict:
    """Open ``count`` one-token sessions and never close them."""
    peer, info = await server_info(node, victim)
    opened, errors = [], {}
    for i in range(count):
        session = f"flood-{i}-{secrets.token_hex(4)}"
        result = await _forward(node, peer, info, session, _inputs(info, 1, i), timeout)
        if result["ok"]:
            opened.append(session)
        else:
            errors[result["error"]] = errors.get(result["error"], 0) + 1
    return {"attack": "mesh_session_flood", "tried": count, "opened": len(opened),
            "refused": count - len(opened), "errors": errors, "sessions": opened}  # fmt: skip


async def prefill_stall(
    attacker: Any, honest: Any, victim: str, prompt_tokens: int = 2048, probe_tokens: int = 8,
    lead: float = 0.2, timeout: float = 120.0,
) -> dict:  # fmt: skip
    """The honest node's time to first token (a new ``probe_tokens`` session) and to its next token
    (a one-token decode step of an open session), alone, then while the attacker's
    ``prompt_tokens`` prompt is being prefilled (the probes start ``lead`` s after it)."""
    peer, info = await server_info(attacker, victim)
    await server_info(honest, victim)
    probe, step = _inputs(info, probe_tokens, seed=1), _inputs(info, 1, seed=2)
    alone, decode_alone, pos = [], [], probe_tokens

    async def first_token() -> dict:  # an honest peer closes its sessions
        session = "probe-" + secrets.token_hex(4)
        result = await _forward(honest, peer, info, session, probe, timeout)
        await honest.rpc.call(peer, "mesh.close", {"session": session}, timeout=timeout)
        return result

    for _ in range(3):
        alone.append((await first_token())["seconds"])
    await _forward(honest, peer, info, "probe-decode", probe, timeout)  # open the decoding session
    for _ in range(3):
        result = await _forward(honest, peer, info, "probe-decode", step, timeout, pos)
        decode_alone.append(result["seconds"])
        pos += 1
    box: dict = {}

    async def prefill() -> None:
        box["prefill"] = await _forward(attacker, peer, info, "prefill-" + secrets.token_hex(4),
                                        _inputs(info, prompt_tokens), timeout)  # fmt: skip

    async def decode_step() -> None:
        box["decode"] = await _forward(honest, peer, info, "probe-decode", step, timeout, pos)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(prefill)
        await trio.sleep(lead)
        nursery.start_soon(decode_step)  # both probes wait in the same prefill
        during = await first_token()
    decode = box["decode"]
    return {"attack": "mesh_prefill_stall", "prompt_tokens": prompt_tokens,
            "prefill_s": box["prefill"]["seconds"], "prefill_error": box["prefill"]["error"],
            "ttft_alone_s": sorted(alone)[1], "ttft_during_s": during["seconds"],
            "decode_alone_s": sorted(decode_alone)[1], "decode_during_s": decode["seconds"],
            "probe_error": during["error"] or decode["error"] or result["error"]}  # fmt: skip


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) << 10 for line in fh if line.startswith("VmHWM:"))


async def _main(attack: str, runs: int, workdir: Path) -> None:
    """One JSON line per run: each attack against a fresh `serve-model` process (tiny model)."""
    import json
    import statistics

    from lattice.testing.daemons import start_daemon

    args = ["--model", "tiny-random:0", "--blocks", "0:6", "--listen", "/ip4/127.0.0.1/tcp/0",
            "--threads", "1"]  # fmt: skip
    rows = []
    for run in range(runs):
        victim = await trio.to_thread.run_sync(
            lambda run=run: start_daemon(workdir, f"victim{run}", args, command="serve-model", timeout=60)
        )
        try:
            addr, idle = victim.info["addrs"][0], _peak_rss(victim.proc.pid)
            async with attacker_node(workdir / f"a{run}") as a, attacker_node(workdir / f"h{run}") as h:
                if attack == "stall":
                    row = await prefill_stall(a, h, addr)
                elif attack == "long":
                    row = await long_prompt(a, addr)
                else:
                    row = await open_sessions(a, addr)
                    peer, info = await server_info(h, addr)
                    row["honest"] = await _forward(h, peer, info, "honest", _inputs(info, 1), 10)
                    del row["sessions"]
            grown = (_peak_rss(victim.proc.pid) - idle) / 2**20
            row |= {"run": run, "victim_alive": victim.proc.poll() is None,
                    "victim_peak_rss_growth_mib": round(grown, 1)}  # fmt: skip
        finally:
            victim.stop()
        rows.append(row)
        print(json.dumps(row), flush=True)
    if attack == "stall":
        keys = ("ttft_alone_s", "ttft_during_s", "decode_alone_s", "decode_during_s", "prefill_s")
        medians = {"median_" + k: statistics.median(r[k] for r in rows) for k in keys}
        print(json.dumps({"attack": "mesh_prefill_stall", "runs": runs, **medians}))


if __name__ == "__main__":  # python tests/attacks/mesh_flood.py {stall,long,flood} [runs]
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mesh-flood-") as tmp:
        trio.run(_main, sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5, Path(tmp))
