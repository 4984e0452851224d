"""bench/anchors/in_testbed.py (issue 19): an anchor's own bench scripts run inside WAN testbed
hosts, so their traffic crosses the emulated links. Skipped without root or without the anchors'
venvs (bench/anchors/setup.sh; CI does not build them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lattice.testing.wan import WanTestbed, wan_unavailable

_BENCH = Path(__file__).resolve().parents[1] / "bench" / "anchors" / "in_testbed.py"


def _in_testbed():
    spec = importlib.util.spec_from_file_location("in_testbed", _BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_reason = wan_unavailable() or _in_testbed().unavailable("lattica")
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"no WAN testbed or Lattica venv: {_reason}")


def test_lattica_rpc_crosses_the_link() -> None:
    """Lattica's small call between two `metro` hosts (10 ms RTT) takes at least that round trip:
    the client and the server talk over the shaped link, not loopback (~0.1 ms)."""
    in_testbed = _in_testbed()
    with WanTestbed(["a", "b"], "metro") as tb:
        lines = in_testbed.rpc(tb, "lattica", "a", "b", runs=1, metrics=["rtt_ms"], rtt_calls=5, timeout=60)
    assert [line["metric"] for line in lines] == ["rtt_ms"], lines
    assert 9.5 <= lines[0]["median"] <= 200


def test_unknown_anchor_is_a_reason() -> None:
    assert "unknown anchor" in (_in_testbed().unavailable("nope") or "")
