"""Interop with Lattica 1.0.21 (rust-libp2p core): real Lattica nodes and lattice-node daemons.

Everything runs in one loopback-only network namespace (tests/_lattica.py); the daemons join the
``lattica`` swarm profile (``--join lattica``: identify version and Kademlia id ``/lattica/1.0.0``),
as a user would. Lattica pickles its DHT values and RPC payloads: a Lattice node refuses them (a
PUT_VALUE reset, a GET_VALUE reply counted malformed, Lattica's RPC protocols not spoken).
Skipped with a message only where the Lattica package cannot be installed or no namespace can be made.
"""

from __future__ import annotations

import time

import pytest

from _lattica import LatticaPeer, LoopbackNamespace, lattica_python
from lattice.testing.daemons import start_daemon, wait_for

pytestmark = pytest.mark.interop

WHY_NOT = LoopbackNamespace.unavailable()
if WHY_NOT:
    pytest.skip(
        f"Lattica interop needs a loopback-only network namespace: {WHY_NOT}", allow_module_level=True
    )
PYTHON, WHY = lattica_python()
if PYTHON is None:
    pytest.skip(f"Lattica SDK unavailable: {WHY}", allow_module_level=True)

KAD = "/lattica/1.0.0"
TIMEOUT = 20.0


@pytest.fixture
def ns():
    with LoopbackNamespace() as space:
        yield space


@pytest.fixture
def net(ns, tmp_path):
    """Start Lattica peers (``net.lattica(port, bootstrap)``) and daemons (``net.daemon(name, args)``)
    in the namespace; all stopped at the end."""

    class Net:
        peers: list[LatticaPeer] = []
        daemons: list = []

        def lattica(self, port: int, bootstrap: list[str] | None = None) -> LatticaPeer:
            peer = LatticaPeer(PYTHON, ns, tmp_path / f"lattica{port}", port, bootstrap)
            self.peers.append(peer)
            return peer

        def daemon(self, name: str, args: list[str] | None = None):
            argv = ["--join", "lattica", "--listen", "/ip4/127.0.0.1/tcp/0", "--reachability", "public",
                    *(args or ["--bootstrap-node"])]  # fmt: skip
            d = start_daemon(tmp_path, name, argv, wrapper=ns.wrapper)
            self.daemons.append(d)
            return d

    n = Net()
    try:
        yield n
    finally:
        for peer in n.peers:
            peer.close()
        for d in n.daemons:
            d.stop()


def connected(daemon, peer_id: str) -> dict | None:
    return next((p for p in daemon.call("peers") if p["peer_id"] == peer_id), None)


def test_connect_both_ways_identify_and_ping(net):
    node = net.daemon("l1")
    # Lattica dials us (its bootstrap) ...
    a = net.lattica(4101, [node.info["addrs"][0]])
    a.wait(lambda p: node.peer_id in p.peers(), TIMEOUT, "connected to the lattice-node")
    info = a.call("peer_info", peer=node.peer_id)["info"]
    assert info["protocol_version"] == KAD  # Lattica drops a peer with any other version
    assert KAD in info["protocols"] and "/ipfs/ping/1.0.0" in info["protocols"]
    row = wait_for(lambda: connected(node, a.peer_id), TIMEOUT, "the Lattica peer listed")
    assert row["direction"] == "inbound" and row["agent"].startswith("rust-libp2p/")
    assert KAD in row["protocols"]
    # ... and we dial Lattica
    b = net.lattica(4102)
    assert node.call("connect", addr=b.addr) == b.peer_id
    assert connected(node, b.peer_id)["direction"] == "outbound"
    b.wait(lambda p: node.peer_id in p.peers(), TIMEOUT, "lists the lattice-node")
    assert b.call("peer_info", peer=node.peer_id)["info"]["protocol_version"] == KAD
    for peer in (a, b):  # ping both ways: ours over /ipfs/ping/1.0.0, Lattica's own keep-alive pings
        rtts = node.call("ping", target=peer.peer_id, count=3)
        assert len(rtts) == 3 and all(r > 0 for r in rtts)
    # still connected later: Lattica did not drop us, we did not ban it (its bitswap is drained)
    time.sleep(2)
    assert connected(node, a.peer_id) and connected(node, b.peer_id)
    assert node.peer_id in a.peers() and node.peer_id in b.peers()
    assert node.call("limits.bans")["banned_peers"] == {}


def test_lattica_bootstraps_through_us_and_finds_a_third_lattica_node(net):
    """Two Lattica nodes know only the lattice-node: their Kademlia (FIND_NODE to us) finds each other."""
    node = net.daemon("l1")
    boot = [node.info["addrs"][0]]
    a = net.lattica(4101, boot)
    b = net.lattica(4102, boot)
    a.wait(lambda p: b.peer_id in p.peers(), TIMEOUT, "found the other Lattica node")
    b.wait(lambda p: a.peer_id in p.peers(), TIMEOUT, "found the other Lattica node")
    status = node.call("dht.status")
    assert status["requests_in"] > 0 and status["malformed"] == 0
    assert status["routing_table"] == 2  # both Lattica nodes are DHT servers of our protocol


def test_we_find_a_third_node_through_lattica(net):
    """A lattice-node bootstrapped through a Lattica node finds another peer by its id alone
    (FIND_NODE to Lattica), and connects to it."""
    a = net.lattica(4101)
    b = net.lattica(4102, [a.addr])
    a.wait(lambda p: b.peer_id in p.peers(), TIMEOUT, "B connected to A")
    node = net.daemon("l1", ["--bootstrap", a.addr])
    wait_for(lambda: connected(node, a.peer_id), TIMEOUT, "bootstrap connection to Lattica")
    assert node.call("connect", addr=b.peer_id) == b.peer_id  # by peer id: a DHT lookup through A
    assert connected(node, b.peer_id)["direction"] == "outbound"
    assert node.call("dht.status")["requests_out"] > 0


def test_providers_both_ways(net):
    node = net.daemon("l1")
    a = net.lattica(4101, [node.info["addrs"][0]])
    wait_for(lambda: node.call("dht.status")["routing_table"] >= 1, TIMEOUT, "Lattica in our table")
    a.call("provide", key="lattica-provides")
    found = wait_for(
        lambda: node.call("dht.providers", key="lattica-provides"), TIMEOUT, "Lattica's provider record"
    )
    assert a.peer_id in [p for p, _ in found]
    assert node.call("dht.provide", key="lattice-provides") >= 1
    got = a.wait(
        lambda p: p.call("providers", key="lattice-provides")["providers"], TIMEOUT, "our provider record"
    )
    assert node.peer_id in got


def test_lattica_values_are_refused_never_unpickled(net):
    """Lattica's store() pickles the value into a Kademlia record: a Lattice node refuses the
    PUT_VALUE (stream reset, counted), stores nothing, and keeps serving Lattica and Lattice peers;
    a Lattica record returned to our GET_VALUE is counted malformed, never decoded."""
    node = net.daemon("l1")
    a = net.lattica(4101, [node.info["addrs"][0]])
    wait_for(lambda: node.call("dht.status")["routing_table"] >= 1, TIMEOUT, "Lattica in our table")
    a.call("store", key="pickled", value={"a": [1, 2, 3]})
    status = wait_for(
        lambda: (s := node.call("dht.status"))["rejected_records"] >= 1 and s,
        TIMEOUT,
        "the refused PUT_VALUE",
    )
    assert status["records"] == 0
    assert node.call("dht.get", key="pickled") == []  # Lattica's reply holds a pickle: not a record
    assert node.call("dht.status")["malformed"] >= 1
    # Lattica keeps its own copy and still reaches us; honest Lattice peers are still served
    assert a.call("get", key="pickled")["value"] is not None
    assert len(node.call("ping", target=a.peer_id, count=2)) == 2
    other = net.daemon("l2", ["--bootstrap", node.info["addrs"][0]])
    wait_for(lambda: other.call("dht.status")["routing_table"] >= 1, TIMEOUT, "the second daemon's table")
    assert other.call("dht.put", key="honest", value="yes") >= 2
    assert [e["value"] for e in node.call("dht.get", key="honest")] == [b"yes"]
