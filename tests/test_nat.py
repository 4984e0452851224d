"""NAT traversal on real Linux NATs: daemons in network namespaces behind nftables masquerade.

A public relay/bootstrap node, peers behind separate NATs that know only the relay's address. These
run the real `lattice-node` processes; bench/nat.py repeats the scenarios 20 times for the figures.
"""

from __future__ import annotations

import pytest

from lattice.testing.daemons import (
    TESTBED_PORT,
    host_addr,
    peer_args,
    peer_path,
    relay_args,
    start_daemon,
    wait_for,
)
from lattice.testing.netns import Site, Testbed, netns_unavailable

pytestmark = pytest.mark.skipif(netns_unavailable() is not None, reason=f"NAT testbed: {netns_unavailable()}")

PORT = TESTBED_PORT


def reserved(daemon) -> list:
    return daemon.call("status")["nat"]["relays"]


@pytest.fixture
def cone_pair(tmp_path):
    with Testbed(public=["relay"], sites=[Site("a", "cone"), Site("b", "cone")]) as tb:
        relay = start_daemon(tmp_path, "relay", relay_args(), tb, "relay")
        boot = host_addr(tb, relay, "relay")
        a = start_daemon(tmp_path, "a1", peer_args(boot), tb, "a1")
        b = start_daemon(tmp_path, "b1", peer_args(boot), tb, "b1")
        yield tb, relay, a, b


def test_cone_nats_hole_punch_to_a_direct_connection_and_move_a_tensor(cone_pair):
    tb, relay, a, b = cone_pair
    wait_for(lambda: reserved(a) and reserved(b), 10, "reservations on the relay")
    # A knows only B's peer id: the DHT (the relay) gives B's relayed address, A dials through it,
    # B starts DCUtR over the relayed connection, and both end up on a direct connection.
    a.call("connect", addr=b.peer_id, timeout=10)
    wait_for(lambda: peer_path(a, b.peer_id) == "direct", 10, "a direct connection A -> B")
    wait_for(lambda: peer_path(b, a.peer_id) == "direct", 5, "a direct connection B -> A")
    row = next(p for p in a.call("peers") if p["peer_id"] == b.peer_id)
    assert row["addr"].startswith(f"/ip4/{tb.public_ip('b')}/tcp/")  # B's NAT, not the relay
    result = a.call("rpc.bench", peer=b.peer_id, size=64 << 20, count=1, direction="up")
    assert result["mib_per_s"] > 20
    # reachability: the NATed peers know they are private, the relay that it is public
    wait_for(lambda: a.call("status")["reachability"] == "private", 10, "A private")
    wait_for(lambda: b.call("status")["reachability"] == "private", 10, "B private")
    wait_for(lambda: relay.call("status")["reachability"] == "public", 10, "relay public")


def test_symmetric_nat_stays_relayed_and_every_service_works(tmp_path):
    with Testbed(public=["relay"], sites=[Site("a", "cone"), Site("b", "symmetric")]) as tb:
        relay = start_daemon(tmp_path, "relay", relay_args(), tb, "relay")
        boot = host_addr(tb, relay, "relay")
        a = start_daemon(tmp_path, "a1", peer_args(boot), tb, "a1")
        b = start_daemon(tmp_path, "b1", peer_args(boot), tb, "b1")
        wait_for(lambda: reserved(a) and reserved(b), 10, "reservations on the relay")
        a.call("connect", addr=b.peer_id, timeout=10)
        assert peer_path(a, b.peer_id) == "relayed"

        def punch_failed():
            row = next((p for p in b.call("peers") if p["peer_id"] == a.peer_id), None)
            return row and row["hole_punch"] and row["hole_punch"]["outcome"].startswith("failed")

        wait_for(punch_failed, 60, "B to give up hole punching")
        assert peer_path(a, b.peer_id) == "relayed"
        status = b.call("status")
        assert status["relayed_peers"] >= 1 and status["paths"][a.peer_id] == "relayed"
        assert status["reachability"] in ("private", "unknown") and status["nat"]["relays"]
        # RPC over the relay (Lattica refuses this), and the DHT through it
        result = a.call("rpc.bench", peer=b.peer_id, size=1 << 20, count=3, direction="echo")
        assert result["median_s"] > 0
        out = a.call("rpc.call", peer=b.peer_id, method="lattice.bench.echo", payload=b"over the relay")
        assert out == b"over the relay"
        stored = b.call("dht.put", key="nat/test", value=b"behind a symmetric NAT")
        assert stored >= 1
        entries = a.call("dht.get", key="nat/test")
        assert [e["value"] for e in entries] == [b"behind a symmetric NAT"]


def test_relay_failover_re_reserves_and_peers_reconnect(tmp_path):
    with Testbed(public=["relay", "relay2"], sites=[Site("a", "symmetric"), Site("b", "symmetric")]) as tb:
        r1 = start_daemon(tmp_path, "relay", relay_args(), tb, "relay")
        r2 = start_daemon(tmp_path, "relay2", relay_args(), tb, "relay2")
        boots = [host_addr(tb, r1, "relay"), host_addr(tb, r2, "relay2")]
        a = start_daemon(tmp_path, "a1", peer_args(*boots), tb, "a1")
        b = start_daemon(tmp_path, "b1", peer_args(*boots), tb, "b1")
        wait_for(lambda: len(reserved(b)) == 2, 10, "B's reservations on both relays")
        wait_for(lambda: a.call("connect", addr=b.peer_id, timeout=5), 10, "A reaching B", interval=0.2)
        # the first call may meet a circuit being replaced (seen once in 3 full CI runs: "stream
        # reset by peer" right after connect; docs/STATUS.md, issue 21): the user's retry is fine
        wait_for(
            lambda: (
                a.call("rpc.call", peer=b.peer_id, method="lattice.bench.echo", payload=b"1", timeout=3)
                == b"1"
            ),
            10,
            "a first RPC to B",
            interval=0.2,
        )
        via = next(p for p in a.call("peers") if p["peer_id"] == b.peer_id)["addr"]
        dead, alive = (r1, r2) if r1.peer_id in via else (r2, r1)
        dead.stop(sig=9)
        import time

        start = time.monotonic()

        def works():
            return (
                a.call("rpc.call", peer=b.peer_id, method="lattice.bench.echo", payload=b"2", timeout=3)
                == b"2"
            )

        wait_for(works, 10, "RPC to B through the other relay", interval=0.2)
        assert time.monotonic() - start < 10
        assert [r["relay"] for r in reserved(b)] == [alive.peer_id]


def test_mdns_finds_a_lan_peer_without_any_bootstrap(tmp_path):
    with Testbed(public=["relay"], sites=[Site("a", "cone", peers=("a1", "a2"))]) as tb:
        args = ["--listen", f"/ip4/0.0.0.0/tcp/{PORT}", "--mdns"]
        a1 = start_daemon(tmp_path, "a1", args, tb, "a1")
        a2 = start_daemon(tmp_path, "a2", args, tb, "a2")
        wait_for(lambda: peer_path(a1, a2.peer_id) == "direct", 10, "a1 connected to a2 over the LAN")
        row = next(p for p in a1.call("peers") if p["peer_id"] == a2.peer_id)
        assert tb.ip("a2") in row["addr"] or tb.ip("a2") in " ".join(row["listen_addrs"])
        assert a1.call("status")["nat"]["lan_peers"] >= 1


def test_a_private_node_finds_a_relay_through_the_dht(tmp_path):
    """The bootstrap node does not relay; a relay elsewhere announces itself in the DHT."""
    with Testbed(public=["boot", "relay"], sites=[Site("a", "cone")]) as tb:
        boot = start_daemon(tmp_path, "boot", ["--listen", f"/ip4/0.0.0.0/tcp/{PORT}"], tb, "boot")
        boot_addr = host_addr(tb, boot, "boot")
        relay = start_daemon(tmp_path, "relay", [*relay_args(), "--bootstrap", boot_addr], tb, "relay")
        a = start_daemon(tmp_path, "a1", peer_args(boot_addr), tb, "a1")
        rows = wait_for(lambda: reserved(a), 30, "a reservation on the relay found in the DHT")
        assert [r["relay"] for r in rows] == [relay.peer_id]
