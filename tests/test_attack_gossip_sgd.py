"""A hostile member of a gossip SGD run against two honest peer processes (tests/attacks/gossip_member.py):
junk references and differences are refused, snapshots are made at most once a round, and the honest
peers train and finish as if it were a silent neighbour."""

from __future__ import annotations

import time

import pytest
import trio

pytest.importorskip("torch")

from attacks.gossip_member import hostile_member
from lattice import Node, NodeConfig
from lattice.apps.gossip_sgd.launch import read_log, start_peers

MLP_DIM = 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10


@pytest.mark.usefixtures("fashion_mnist")
@pytest.mark.slow  # two peer processes and 12 rounds under attack: ~30 s on 2 busy cores
def test_a_hostile_member_does_not_stop_honest_peers(tmp_path):
    rounds, steps = 12, 2
    args = ["--algorithm", "cdproxsgt", "--rounds", str(rounds), "--train-limit", "6000",
            "--test-limit", "1000", "--eval-every", "1", "--wait", "40", "--timeout", "4", "--linger", "5",
            "--set", f"local_steps={steps}", "--checkpoint-every", "0"]  # fmt: skip
    procs = start_peers(2, "t-hostile", tmp_path, args)
    try:
        addr = (tmp_path / "bootstrap.addr").read_text().strip()
        deadline = time.monotonic() + 60
        while not any(r.get("event") == "start" for r in read_log(tmp_path / "peer1" / "log.jsonl")):
            assert time.monotonic() < deadline, (tmp_path / "peer1" / "stderr").read_text()[-3000:]
            time.sleep(0.1)

        async def attack():
            cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / "attacker", control=False,
                             bootstrap=[addr])  # fmt: skip
            async with Node(cfg) as node:
                with trio.fail_after(10):
                    while not await node.peers():
                        await trio.sleep(0.05)
                return await hostile_member(node, "t-hostile", MLP_DIM, steps, seconds=20)

        seen = trio.run(attack)
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), (tmp_path / "peer0" / "stderr").read_text()[-3000:]
    assert seen["replies"].get("ok", 0) > 0  # it was a member: its junk reached the phases
    assert seen["replies"]["snapshot"] > 5 * rounds  # asked far more often than once a round
    for i in range(2):  # snapshots stored: one a round at most (+ the final model), however often asked
        stored = list((tmp_path / f"peer{i}" / "node" / "content" / "data").iterdir())
        assert len(stored) <= rounds + 2, len(stored)
    for i in range(2):
        log = read_log(tmp_path / f"peer{i}" / "log.jsonl")
        last = [r for r in log if r.get("event") == "round"][-1]
        assert last["round"] == rounds and last["acc_local"] > 0.4
