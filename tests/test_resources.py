"""The resource manager's bookkeeping (lattice.transport.resources): pure, no sockets."""

from __future__ import annotations

import pytest

from lattice.errors import ConfigError
from lattice.transport.limits import ip_prefix
from lattice.transport.resources import MiB, ResourceLimitExceeded, ResourceLimits, ResourceManager


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def manager(**kw) -> tuple[ResourceManager, Clock]:
    clock = Clock()
    kw.setdefault("max_memory", 64 * MiB)
    return ResourceManager(ResourceLimits(**kw), clock), clock


def test_ip_prefix_groups_a_subnet():
    assert ip_prefix("203.0.113.7") == ip_prefix("203.0.113.200") == "203.0.113.0/24"
    assert ip_prefix("203.0.114.7") != ip_prefix("203.0.113.7")
    assert ip_prefix("2001:db8:1:2::5") == "2001:db8:1::/48"
    assert ip_prefix("::ffff:203.0.113.9") == "203.0.113.0/24"
    assert ip_prefix("not an ip") == "not an ip"


def test_limits_are_validated():
    with pytest.raises(ConfigError):
        ResourceLimits(peer_memory=1.5)
    with pytest.raises(ConfigError):
        ResourceLimits(max_memory=1024)
    with pytest.raises(ConfigError):
        ResourceLimits(max_connections=-1)
    assert ResourceLimits().memory >= 256 * MiB  # derived from the machine's RAM


def test_a_peer_is_held_to_its_cap_and_a_refusal_takes_nothing():
    rm, _ = manager(peer_memory=0.25)  # 16 MiB per peer
    rm.open_connection("a", "198.51.100.1")
    lease = rm.lease("a")
    lease.grow(10 * MiB)
    with pytest.raises(ResourceLimitExceeded) as err:
        lease.grow(7 * MiB)
    assert err.value.scope == "peer" and "peer" in str(err.value)
    assert lease.held == 10 * MiB and rm.node.memory == 10 * MiB  # nothing taken by the refusal
    assert rm.stats()["refusals"] == {"peer:memory": 1}
    lease.close()
    assert rm.node.memory == 0 and lease.held == 0


def test_optional_memory_leaves_half_of_the_budget_for_what_must_be_sent():
    """A receive window grown for speed on one transfer must not leave the peer without room for
    its next message (seen under load: windows grown to 12 of 16 MiB refused a 6 MiB call)."""
    rm, _ = manager(peer_memory=0.25)  # 16 MiB per peer
    rm.open_connection("a", "198.51.100.1")
    window, message = rm.lease("a"), rm.lease("a")
    assert window.try_grow(8 * MiB, optional=True)
    assert not window.try_grow(1, optional=True)  # half of the peer's budget is the optional cap
    assert rm.stats()["refusals"] == {}  # an optional reservation declined is no refusal
    message.grow(8 * MiB)  # what the peer must send still fits
    assert rm.node.memory == 16 * MiB
    window.close(), message.close()


def test_fair_share_under_pressure_keeps_room_for_others():
    rm, _ = manager(peer_memory=1.0, prefix_memory=1.0, fair_share_above=0.5)
    hog, honest = rm.lease("hog"), rm.lease("honest")
    hog.grow(30 * MiB)  # below half of the node: no share rule yet
    assert hog.try_grow(4 * MiB)  # 34 of 64: above half, but the hog is alone (share = all)
    assert honest.try_grow(1 * MiB)  # two holders now: shares of 32 MiB each
    assert not hog.try_grow(1 * MiB)  # 34 > 32: held to its share while others hold memory
    assert honest.try_grow(20 * MiB)  # the honest peer still gets its share
    assert rm.refusals == {"peer:memory": 1}


def test_a_prefix_is_capped_across_its_peers_and_local_addresses_are_exempt():
    rm, _ = manager(peer_memory=1.0, prefix_memory=0.25)  # 16 MiB per /24
    for i, peer in enumerate(("s1", "s2", "s3")):
        rm.open_connection(peer, f"192.0.2.{i + 1}")
    leases = [rm.lease(p) for p in ("s1", "s2", "s3")]
    leases[0].grow(8 * MiB)
    leases[1].grow(8 * MiB)
    with pytest.raises(ResourceLimitExceeded) as err:
        leases[2].grow(1)
    assert err.value.scope == "prefix"
    rm.open_connection("local", "127.0.0.1")
    assert rm.lease("local").try_grow(16 * MiB)  # loopback: no prefix cap
    assert {p["name"] for p in rm.stats()["prefixes"]} == {"192.0.2.0/24"}


def test_services_have_their_own_cap():
    rm, _ = manager(peer_memory=1.0)
    rm.set_service_memory("rpc", 4 * MiB)
    lease = rm.lease("a", "rpc")
    lease.grow(4 * MiB)
    with pytest.raises(ResourceLimitExceeded) as err:
        lease.grow(1)
    assert err.value.scope == "service"
    assert rm.stats()["services"]["rpc"]["memory"] == 4 * MiB


def test_scopes_are_dropped_when_idle_and_leases_find_them_again():
    rm, _ = manager()
    rm.open_connection("a", "198.51.100.1")
    assert rm.try_open_stream("a")
    lease = rm.lease("a")
    lease.grow(MiB)
    lease.close()
    rm.close_stream("a")
    rm.close_connection("a", "198.51.100.1")
    assert rm.stats()["tracked_peers"] == 0 and rm.stats()["prefixes"] == []
    rm.open_connection("a", "198.51.100.1")
    lease.grow(MiB)  # the empty lease charges the peer's new scope, not the dropped one
    assert rm.peer_usage("a")["memory"] == MiB
    assert rm.stats()["prefixes"][0]["memory"] == MiB


def test_connection_caps_per_peer_prefix_and_node():
    rm, _ = manager(peer_connections=2, prefix_connections=3, max_connections=4)
    rm.open_connection("a", "198.51.100.1")
    rm.open_connection("a", "198.51.100.1")
    with pytest.raises(ResourceLimitExceeded) as err:
        rm.open_connection("a", "198.51.100.1")
    assert err.value.scope == "peer"
    rm.open_connection("b", "198.51.100.2")
    with pytest.raises(ResourceLimitExceeded) as err:
        rm.open_connection("c", "198.51.100.3")
    assert err.value.scope == "prefix"
    rm.open_connection("d", "203.0.113.1")
    with pytest.raises(ResourceLimitExceeded) as err:
        rm.open_connection("e", "192.0.2.1")
    assert err.value.scope == "node"
    rm.close_connection("a", "198.51.100.1")
    rm.open_connection("e", "192.0.2.1")


def test_stream_caps():
    rm, _ = manager(peer_streams=2, max_streams=3)
    assert rm.try_open_stream("a") and rm.try_open_stream("a")
    assert not rm.try_open_stream("a")
    assert rm.try_open_stream("b")
    assert not rm.try_open_stream("c")  # node full
    rm.close_stream("a")
    assert rm.try_open_stream("c")


def test_pending_handshakes_are_capped_per_ip_and_prefix():
    rm, _ = manager(ip_pending_handshakes=2, prefix_pending_handshakes=3, max_pending_handshakes=64)
    a1, a2 = rm.begin_handshake("198.51.100.1"), rm.begin_handshake("198.51.100.1")
    assert a1 and a2 and rm.begin_handshake("198.51.100.1") is None  # per IP
    assert rm.begin_handshake("198.51.100.2") is not None
    assert rm.begin_handshake("198.51.100.3") is None  # per prefix
    assert rm.begin_handshake("203.0.113.1") is not None  # another prefix is admitted
    rm.end_handshake(a1)
    rm.end_handshake(a1)  # idempotent
    assert rm.begin_handshake("198.51.100.1") is not None
    assert rm.pending_handshakes == 4


def test_a_full_node_evicts_from_the_prefix_holding_the_most_at_once():
    rm, clock = manager(max_pending_handshakes=4, ip_pending_handshakes=4, prefix_pending_handshakes=4)
    evicted = []
    for i in range(4):  # one prefix holds every slot
        t = rm.begin_handshake(f"198.51.100.{i}")
        t.evict = lambda i=i: evicted.append(i)
        clock.now += 0.01
    assert rm.begin_handshake("203.0.113.5") is not None  # another prefix: fairness, whatever the age
    assert evicted == [0] and rm.pending_handshakes == 4 and rm.evicted_handshakes == 1


def test_between_balanced_prefixes_only_a_stale_handshake_is_evicted():
    rm, clock = manager(max_pending_handshakes=4)
    evicted = []
    for i in range(4):  # four prefixes, one pending handshake each
        t = rm.begin_handshake(f"198.51.{100 + i}.1")
        t.evict = lambda i=i: evicted.append(i)
        clock.now += 0.01
    assert rm.begin_handshake("203.0.113.5") is None  # all young: a handshake may be under way
    clock.now += 1.0
    assert rm.begin_handshake("203.0.113.5") is not None and evicted == [0]  # the oldest, stale


def test_handshake_deadline_shrinks_under_pressure():
    rm, _ = manager(max_pending_handshakes=4, handshake_timeout=10.0, pressured_handshake_timeout=2.0)
    assert rm.handshake_deadline() == 10.0
    rm.begin_handshake("198.51.100.1")
    rm.begin_handshake("203.0.113.1")
    assert rm.handshake_deadline() == 2.0


def test_a_reconnect_storm_is_refused_at_accept_per_ip_and_per_prefix():
    rm, clock = manager(ip_accept_rate=2.0, prefix_accept_rate=5.0, ip_pending_handshakes=100,
                        prefix_pending_handshakes=100)  # fmt: skip
    for _ in range(4):  # burst of 2x the rate from one IP
        rm.end_handshake(rm.begin_handshake("198.51.100.1"))
    assert rm.begin_handshake("198.51.100.1") is None
    for i in range(2, 8):  # other IPs of the prefix: the prefix's burst (10) runs out
        rm.end_handshake(rm.begin_handshake(f"198.51.100.{i}"))
    assert rm.begin_handshake("198.51.100.9") is None
    assert rm.begin_handshake("203.0.113.1") is not None  # another prefix is not affected
    assert rm.begin_handshake("127.0.0.1") is not None  # exempt
    clock.now += 1.0
    assert rm.begin_handshake("198.51.100.1") is not None  # refilled
    assert rm.refusals["node:accept_rate_ip"] == 1 and rm.refusals["node:accept_rate_prefix"] == 1


def test_the_node_wide_accept_rate_is_shared_fairly_between_prefixes():
    rm, clock = manager(node_accept_rate=20.0, ip_accept_rate=1000.0, prefix_accept_rate=1000.0,
                        ip_pending_handshakes=1000, prefix_pending_handshakes=1000,
                        max_pending_handshakes=1000)  # fmt: skip
    admitted = 0
    for i in range(200):  # a Sybil reconnecting from 4 prefixes, within one second
        ticket = rm.begin_handshake(f"198.51.{100 + i % 4}.{1 + i // 4 % 200}")
        if ticket is not None:
            admitted += 1
            rm.end_handshake(ticket)
    assert admitted <= 25  # about the node-wide rate, not 200
    assert rm.begin_handshake("203.0.113.9") is not None  # a quiet prefix still gets in
    assert rm.refusals["node:accept_rate_node"] > 0
    clock.now += 1.0
    assert rm.begin_handshake("198.51.100.1") is not None  # a new second
