"""A hostile member of a gossip SGD run (issue 18), against real peer processes.

It joins run ``run`` with the settings the members hold (membership is open: anyone can), answers
the honest peers' messages ``ok`` (so it is never marked dead), and until ``seconds`` pass, for every
phase of the current rounds, sends what a receiver must refuse without harm: full CDProxSGT
references full of NaN or of the wrong size, differences of the wrong size, a request for full
references every time (``want_full``), and floods ``gossip_sgd.snapshot``. Returns what the
victims answered, so tests/test_attack_gossip_sgd.py and bench/attack.py share it.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import trio

from lattice.errors import LatticeError
from lattice.identity import PeerId

METHOD, SNAPSHOT = "gossip_sgd.exchange", "gossip_sgd.snapshot"


async def hostile_member(
    node: Any, run: str, dim: int, local_steps: int, seconds: float, snapshot_burst: int = 10
) -> dict:
    """``node``: the attacker's node, connected to the run's peers; ``dim``: the model's parameters;
    ``snapshot_burst``: snapshot requests per victim per pass."""
    doc = node.crdt.open(f"gossip_sgd/{run}")

    async def ok(payload: Any, ctx: Any) -> str:
        return "ok"

    node.rpc.register(METHOD, ok)
    with trio.fail_after(30):  # the honest members' settings reach us through the CRDT
        while not doc.get_map("configs"):
            await trio.sleep(0.1)
    settings = Counter(v for v in doc.get_map("configs").values() if isinstance(v, str)).most_common(1)[0][0]
    me = str(node.peer_id)
    doc.get_map("configs")[me] = settings
    doc.get_map("members")[me] = 0
    victims = [p for p in doc.get_map("members") if p != me]
    replies: Counter = Counter()
    snapshots: set[str] = set()
    nan = np.full(dim, np.nan, dtype=np.float32)
    short = np.zeros(dim // 2, dtype=np.float32)
    phases = [f"{kind}{k}" for k in range(local_steps) for kind in ("y", "x")]
    with trio.move_on_after(seconds):
        while True:
            furthest = max((int(v) for v in doc.get_map("progress").values()), default=-1)
            for victim in victims:
                for rnd in range(max(0, furthest), furthest + 3):
                    for i, phase in enumerate(phases):
                        name = "dy" if phase[0] == "y" else "dx"
                        junk = (
                            {"tensors": {name: short}}
                            if i % 2
                            else {"tensors": {name: nan}, "full": {name: nan}}
                        )
                        payload = {
                            "run": run,
                            "round": rnd,
                            "phase": phase,
                            "want_full": ["dx", "dy"],
                            **junk,
                        }
                        replies[await _call(node, victim, METHOD, payload)] += 1
                for _ in range(snapshot_burst):
                    reply = await _call(node, victim, SNAPSHOT, {"run": run})
                    if isinstance(reply, dict) and isinstance(reply.get("cid"), str):
                        snapshots.add(reply["cid"])
                    replies["snapshot"] += 1
            await trio.sleep(0.05)
    return {"replies": dict(replies), "snapshot_ids": len(snapshots), "victims": victims,
            "settings": json.loads(settings)}  # fmt: skip


async def _call(node: Any, peer: str, method: str, payload: Any) -> Any:
    try:
        return await node.rpc.call(PeerId.from_string(peer), method, payload, timeout=5)
    except (LatticeError, trio.TooSlowError) as exc:
        return type(exc).__name__
