"""Chain choice, block splitting and announcement parsing (pure functions, no network)."""

from __future__ import annotations

import msgpack
import pytest

from lattice.apps.mesh_inference.errors import NoChainError
from lattice.apps.mesh_inference.routing import (
    ServerInfo,
    choose_blocks,
    find_chain,
    plan_split,
    uncovered,
)


def srv(peer, start, end, thr=10.0, sessions=0, max_sessions=8, n=30):
    addrs = ("/ip4/1.2.3.4/tcp/1",)
    return ServerInfo(peer, start, end, n, thr, 1 << 30, 1 << 28, sessions, max_sessions, addrs)


def ranges(chain):
    return [(h.server.peer, h.start, h.end) for h in chain]


def test_fewest_hops_then_fastest():
    servers = [srv("a", 0, 10), srv("b", 10, 20), srv("c", 20, 30), srv("big", 0, 20, thr=1.0)]
    assert ranges(find_chain(servers, 0, 30)) == [("big", 0, 20), ("c", 20, 30)]
    servers.append(srv("big2", 0, 20, thr=5.0))
    assert ranges(find_chain(servers, 0, 30))[0][0] == "big2"
    # overlapping ranges: a server runs only the part that is still needed
    servers = [srv("a", 0, 12), srv("b", 8, 30)]
    assert ranges(find_chain(servers, 0, 30)) == [("a", 0, 12), ("b", 12, 30)]


def test_excluded_and_full_servers_are_skipped():
    servers = [srv("a", 0, 10), srv("b", 10, 30), srv("b2", 10, 30, sessions=8), srv("b3", 10, 30)]
    assert ranges(find_chain(servers, 0, 30, exclude={"b"}))[1][0] == "b3"
    with pytest.raises(NoChainError) as err:
        find_chain(servers, 0, 30, "m", exclude={"b", "b3"})
    assert err.value.missing == [(10, 30)] and "10:30" in str(err.value)


def test_no_chain_names_every_gap():
    servers = [srv("a", 0, 5), srv("b", 10, 20), srv("c", 25, 30)]
    assert uncovered(servers, 0, 30) == [(5, 10), (20, 25)]
    with pytest.raises(NoChainError, match="5:10, 20:25"):
        find_chain(servers, 0, 30, "smol")
    with pytest.raises(NoChainError, match="0:30"):
        find_chain([], 0, 30, "smol")


def test_sub_range_chains_for_recovery():
    servers = [srv("a", 0, 10), srv("x", 5, 15), srv("y", 15, 30)]
    assert ranges(find_chain(servers, 10, 20)) == [("x", 10, 15), ("y", 15, 20)]


def test_plan_split_follows_speed_and_memory():
    assert plan_split(30, [(10**9, 1.0)] * 3, 10**6) == [(0, 10), (10, 20), (20, 30)]
    split = plan_split(30, [(10**9, 2.0), (10**9, 1.0)], 10**6)
    assert split == [(0, 20), (20, 30)]
    # the fast peer has room for 5 blocks only: the rest goes to the others
    split = plan_split(30, [(5 * 10**6, 10.0), (10**9, 1.0), (10**9, 1.0)], 10**6)
    assert split[0] == (0, 5) and split[-1][1] == 30
    assert sum(b - a for a, b in split) == 30
    with pytest.raises(ValueError, match="do not fit"):
        plan_split(30, [(10 * 10**6, 1.0)], 10**6)


def test_choose_blocks_takes_the_least_served_window():
    servers = [srv("a", 0, 10), srv("b", 10, 20)]
    assert choose_blocks(servers, 30, 10) == (20, 30)
    assert choose_blocks([], 30, 10) == (0, 10)


def test_malformed_announcements_are_dropped():
    good = srv("p", 0, 10).encode()
    assert ServerInfo.decode("p", good) == srv("p", 0, 10)
    for bad in (
        b"\xc1",
        msgpack.packb({"start": 5, "end": 2, "n_layers": 30}),
        msgpack.packb([1, 2, 3]),
        msgpack.packb({**msgpack.unpackb(good), "start": -1}),
        msgpack.packb({**msgpack.unpackb(good), "end": 31}),
        msgpack.packb({**msgpack.unpackb(good), "addrs": ["not-a-multiaddr"]}),
        msgpack.packb({**msgpack.unpackb(good), "throughput": "fast"}),
        msgpack.packb({**msgpack.unpackb(good), "addrs": ["/x"] * 100}),
    ):
        assert ServerInfo.decode("p", bad) is None
