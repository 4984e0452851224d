"""Scope-aware dialing (lattice.transport.scope): which of a peer's addresses are worth a dial."""

from __future__ import annotations

import ipaddress

from lattice.multiaddr import Multiaddr
from lattice.transport.scope import Vantage, network_of, plausible

R = "12D3KooWGyK1qEBPrNwSm8whAfmbkaE6pZB2KUMvdwDKxC8hkUmE"

# a peer behind a home NAT: 192.168.1.2 on its LAN, reached the testbed's "internet" (10.77.0.0/24)
HOME = Vantage(
    own=frozenset({("127.0.0.1", 4001), ("192.168.1.2", 4001)}),
    local_ips=frozenset({"127.0.0.1", "192.168.1.2"}),
    networks=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("192.168.1.0/24"),
              ipaddress.ip_network("10.77.0.0/24")),
)  # fmt: skip


def addrs(*texts: str) -> list[Multiaddr]:
    return [Multiaddr.parse(t) for t in texts]


def test_another_homes_lan_and_loopback_are_not_dialed():
    theirs = addrs("/ip4/127.0.0.1/tcp/4001", "/ip4/192.168.2.2/tcp/4001",
                   f"/ip4/10.77.0.10/tcp/4001/p2p/{R}/p2p-circuit", "/ip4/1.1.1.1/tcp/4001")  # fmt: skip
    assert plausible(theirs, HOME) == theirs[2:]


def test_our_own_address_is_never_dialed_even_on_this_machine():
    theirs = addrs("/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/tcp/4002", "/ip4/192.168.1.2/tcp/4002")
    assert plausible(theirs, HOME) == theirs[1:]  # a second node here: its loopback is fine


def test_same_lan_and_shared_private_networks_are_dialed():
    theirs = addrs("/ip4/192.168.1.7/tcp/4001", "/ip4/10.77.0.102/tcp/4001", "/ip4/10.9.0.1/tcp/4001")
    assert plausible(theirs, HOME) == theirs[:2]


def test_dns_names_and_relays_on_loopback_are_kept():
    theirs = addrs("/dns4/boot.example.org/tcp/4001", f"/ip4/127.0.0.1/tcp/5000/p2p/{R}/p2p-circuit",
                   f"/ip4/127.0.0.1/tcp/4001/p2p/{R}/p2p-circuit")  # fmt: skip
    assert plausible(theirs, HOME) == theirs[:2]  # the last relay is us


def test_only_private_non_loopback_addresses_name_a_network():
    assert network_of("10.77.0.102") == ipaddress.ip_network("10.77.0.0/24")
    assert network_of("fd00::5") == ipaddress.ip_network("fd00::/64")
    assert network_of("127.0.0.1") is None and network_of("1.1.1.1") is None


def test_a_routed_private_network_is_shared_up_to_a_16():
    # a pod network: we are 10.244.1.5, a bootstrap pod elsewhere is 10.244.200.3
    assert network_of("10.244.200.3", "10.244.1.5") == ipaddress.ip_network("10.244.0.0/16")
    # a home LAN reaching a testbed or datacenter network: only the far /24
    assert network_of("10.77.0.10", "192.168.1.2") == ipaddress.ip_network("10.77.0.0/24")
    assert network_of("10.1.0.10", "10.2.0.3") == ipaddress.ip_network("10.1.0.0/24")
