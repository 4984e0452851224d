"""The README's first command (examples/local_swarm.py) works end to end with real daemons."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
