"""Partition 4|4 and heal: 8 daemons in network namespaces on one bridge, split by nftables."""

from __future__ import annotations

import pytest

from crdt_scenarios import partition_heal
from lattice.testing.netns import netns_unavailable

pytestmark = pytest.mark.skipif(netns_unavailable() is not None, reason=f"testbed: {netns_unavailable()}")


def _check(r: dict, target: float) -> None:
    assert r["peers_before_heal"] == [3] * 8, r  # the cut connections were noticed and closed
    assert r["heal_to_identical_s"] is not None and r["heal_to_identical_s"] <= target, r
    assert r["identical_maps"] and r["keys"] == r["expected_keys"], r
    assert r["leader"] in ("left", "right")  # both halves wrote it: one value everywhere


def test_partition_4_4_heals_to_identical_state(tmp_path):
    # 10 s of partition: long enough for the replica probes (every 5 s, 3 s timeout) to close the
    # cut connections; the heal target is 2 s, the bound here leaves room for a contended machine
    _check(partition_heal(tmp_path, nodes=8, partition_s=10, writes=100), target=5.0)


@pytest.mark.slow
def test_partition_4_4_for_30_s_heals_within_2_s(tmp_path):
    _check(partition_heal(tmp_path, nodes=8, partition_s=30, writes=300), target=2.0)
