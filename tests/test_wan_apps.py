"""bench/wan_apps.py (issue 19): the floors it measures against, and short runs of its two benches
on a real WAN testbed (skipped without root)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lattice.testing.wan import wan_unavailable

_reason = wan_unavailable()
needs_root = pytest.mark.skipif(_reason is not None, reason=_reason or "")


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "wan_apps.py"
    spec = importlib.util.spec_from_file_location("wan_apps", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_floors() -> None:
    b = _bench()
    assert b.wire_bytes(4 << 20, None) == 16 << 20
    assert b.wire_bytes(4 << 20, "fp16") == 8 << 20  # the codec that halves the bytes
    # 16 MiB to two neighbours over 200 Mbit/s, plus a 40 ms round trip
    assert b.gossip_floor_s(16 << 20, 2, 200, 40) == pytest.approx(2 * 16 * 1.048576 * 8 / 200 + 0.04)
    # on a ring of 2 each peer's two neighbours are the same peer: one message each way
    assert [b.ring_neighbours(n) for n in (2, 3, 4, 8)] == [1, 2, 2, 2]


@needs_root
def test_gossip_round_smoke() -> None:
    """Three peers, small messages, `metro`: every peer reports its rounds, the plain-TCP ring too."""
    r = _bench().gossip_round("metro", peers=3, numel=1 << 16, rounds=3, timeout=30)
    assert "error" not in r, r.get("error")
    assert r["rounds_measured"] == 3 * 2 and r["timeouts"] == 0
    assert r["median_round_s"] >= 0.010  # at least the link's round trip
    assert r["tcp_median_round_s"] is not None and r["tcp_median_round_s"] >= 0.005
    assert r["io_per_mib_per_peer"]["read_waits"] > 0


@needs_root
def test_gossip_round_two_pinned_peers() -> None:
    """Two peers, each on its own core: one neighbour each, so the floor is one message's wire time."""
    r = _bench().gossip_round("metro", peers=2, numel=1 << 16, rounds=3, timeout=30, pin=True)
    assert "error" not in r, r.get("error")
    assert r["neighbours"] == 1 and r["pinned"]
    assert r["floor_s"] == pytest.approx(r["message_mb"] * 8 / 500 + 0.010, abs=0.001)
    assert r["rounds_measured"] == 2 * 2 and r["timeouts"] == 0
    assert r["tcp_median_round_s"] is not None


@needs_root
@pytest.mark.slow
def test_mesh_tps_smoke() -> None:
    """Three stages and a client 10 ms apart: tokens flow, and no faster than the floor allows."""
    r = _bench().mesh_tps(rtt_ms=10, tokens=6, runs=1)
    assert r["mesh_tps"] > 0
    assert r["median_step_ms"] >= 3 * 10 * 0.95  # one round trip per hop per token
    assert r["ratio"] <= 1.05


@needs_root
@pytest.mark.slow
def test_content_fetch_smoke() -> None:
    """Four providers on `mixed` links, one fetcher: the whole file arrives, no faster than its floor."""
    r = _bench().content_fetch(size=8 << 20, runs=1)
    assert r["last_item"]["bytes"] == 8 << 20
    assert r["ratio"] >= 0.95


def test_accuracy_at_a_time_is_the_last_evaluation_by_then() -> None:
    rounds = [{"t_s": 10.0, "acc_local": 0.5}, {"t_s": 70.0, "acc_local": 0.7}]
    acc_at = _bench().acc_at
    assert acc_at(rounds, 5) is None and acc_at(rounds, 60) == 0.5 and acc_at(rounds, 70) == 0.7


@needs_root
@pytest.mark.usefixtures("fashion_mnist")
@pytest.mark.slow  # 8 training peers start and load their data: ~40-90 s on the shared machine
def test_train_runs_smoke() -> None:
    """Two codecs side by side for a 3 s budget on `lan`: both stop past it with an average model."""
    args = ["--algorithm", "dfedavg", "--model", "mlp:32", "--rounds", "100000", "--train-limit", "2000",
            "--test-limit", "300", "--eval-every", "2", "--set=local_steps=1", "--wait", "120",
            "--linger", "30"]  # fmt: skip
    none, fp16 = _bench().train_runs("lan", [None, "fp16"], 3.0, args, every_s=1.0)
    for r in (none, fp16):
        assert "errors" not in r, r["errors"]
        assert r["rounds"] > 7 and r["end_t_s"] > 3.0 and r["acc_avg_end"] > 0.3 and r["timeouts"] == 0
        assert [a["t_s"] for a in r["acc_at"]] == [1.0, 2.0, 3.0]
    assert fp16["mb_sent_per_peer"] / fp16["rounds"] < none["mb_sent_per_peer"] / none["rounds"]
