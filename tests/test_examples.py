"""The README's first command (examples/local_swarm.py) works end to end with real daemons."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_local_swarm_demo_uses_every_service():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "local_swarm.py"), "--nodes", "3"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "3 daemons ready" in text
    assert "node2 reads 'hello swarm'" in text
    assert "node2 sees lr=0.05" in text
    assert "equal: True" in text
    assert text.rstrip().endswith("all daemons stopped")


@pytest.mark.slow  # two processes importing torch, 20 steps: ~25 s on a busy 2-core machine
@pytest.mark.usefixtures("fashion_mnist")
def test_gossip_training_example_trains_a_user_module_from_a_plain_script():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "gossip_training.py"), "--peers", "2", "--steps", "20",
         "--train-limit", "2000"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("peer 12D3KooW") and " listening on /ip4/127.0.0.1/tcp/" in lines[0]
    for rank in (0, 1):
        own = next(line for line in lines if line.startswith(f"rank {rank}: ") and "own model" in line)
        avg = next(line for line in lines if line.startswith(f"rank {rank}: average model of 2 peers"))
        assert float(own.rsplit(" ", 1)[1]) > 0.3 and float(avg.rsplit(" ", 1)[1]) > 0.3
