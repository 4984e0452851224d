"""Circuit relay v2 and DCUtR abuse against real daemons (issue 16, "not tried yet"): a relay daemon
(the victim of the reservation and circuit floods) and a private daemon reserved on it (the target
of the circuit flood, the victim of the hole-punch reflection). Attackers connect from 127.0.x.y
(x > 0), which no limit exempts; honest peers come from 127.0.0.1."""

from __future__ import annotations

import pytest

from attacks import relay_abuse, relay_poison
from lattice.multiaddr import Multiaddr
from lattice.nat import circuit
from lattice.testing.daemons import start_daemon, wait_for

LOOPBACK = ["--listen", "/ip4/127.0.0.1/tcp/0"]


@pytest.fixture
def relay(tmp_path):
    daemon = start_daemon(tmp_path, "relay", [*LOOPBACK, "--relay"])
    yield daemon
    daemon.stop()


@pytest.fixture
def reserved(tmp_path, relay):
    """A private daemon holding a reservation on the relay; yields (daemon, its relayed address)."""
    daemon = start_daemon(
        tmp_path, "private", [*LOOPBACK, "--reachability", "private", "--bootstrap", relay.info["addrs"][0]]
    )
    try:
        wait_for(lambda: daemon.call("status")["nat"]["relays"], 10, "a reservation on the relay")
        addr = next(a for a in daemon.call("status")["addrs"] if "/p2p-circuit" in a)
        yield daemon, addr
    finally:
        daemon.stop()


def first_error(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__


async def honest_reservation(relay_addr: str) -> str:
    try:
        async with relay_abuse.peer_at(relay_addr, "127.0.0.1") as (host, conn):
            await circuit.reserve(host, conn)
        return "ok"
    except Exception as exc:  # the host's nursery wraps errors in an ExceptionGroup
        return first_error(exc)


async def honest_relayed_dial(relay_addr: str, target: str) -> str:
    try:
        async with relay_abuse.peer_at(relay_addr, "127.0.0.1") as (host, _conn):
            conn = await circuit.dial(host, Multiaddr.parse(target))
            assert conn.relayed
        return "ok"
    except Exception as exc:  # the host's nursery wraps errors in an ExceptionGroup
        return first_error(exc)


def assert_clean(*daemons) -> None:
    for daemon in daemons:
        assert "Traceback" not in daemon.log(), daemon.log()[-3000:]


async def test_reservation_floods_leave_room_for_honest_peers(relay):
    """128 identities from 2 /24s (8 IPs each, 8 per IP) hold their connections and reservations.
    Before: they took all 128 slots and an honest peer was refused; reservations also outlived
    their connections (a hang-up flood filled the relay for an hour)."""
    addr = relay.info["addrs"][0]
    sources = [f"127.0.{p}.{i}" for p in (1, 2) for i in range(1, 9)]
    held = await relay_abuse.reservation_flood(
        addr, sources, per_source=8, hold=True, on_held=lambda: honest_reservation(addr)
    )
    assert held["while_held"] == "ok", held
    assert held["granted"] <= 2 * 16, held  # max_reservations_per_prefix
    hung_up = await relay_abuse.reservation_flood(addr, [f"127.0.3.{i}" for i in range(1, 5)], per_source=4)
    assert hung_up["granted"] == 16, hung_up
    assert relay.call("status")["nat"]["relay_service"]["reservations"] <= 1  # the honest one, if alive
    assert await honest_reservation(addr) == "ok"
    assert_clean(relay)


async def test_a_circuit_flood_cannot_take_a_reserved_peers_circuits(relay, reserved):
    """4 identities of one IP send 8 CONNECTs each to the reserved peer at once and stay silent.
    Before: 32 circuits opened (the cap of 8 per peer was checked before a wait and counted after
    it) and an honest dial to the peer was refused."""
    private, target = reserved
    addr = relay.info["addrs"][0]
    result = await relay_abuse.circuit_flood(
        addr, private.peer_id, ["127.0.1.1"], identities=4, circuits=8, hold=5.0,
        on_held=lambda: honest_relayed_dial(addr, target),
    )  # fmt: skip
    assert result["while_held"] == "ok", result
    assert result["opened"] <= 4 and result["refused"] >= 28, result  # 4 per (prefix, target)
    assert await honest_relayed_dial(addr, target) == "ok"
    assert_clean(relay, private)


async def test_hole_punch_requests_cannot_make_a_node_dial_third_parties(relay, reserved, nursery):
    """A peer on a relayed connection sends 60 hole-punch requests at once naming 8 third parties'
    addresses (closed ports that count what reaches them). Before: every request made the victim
    dial them (102 connections in 4 s); now 3 punches per peer a minute, 4 addresses each."""
    private, target = reserved
    listeners = [relay_poison.SilentListener(reset=True) for _ in range(8)]
    for listener in listeners:
        await nursery.start(listener.run)
    result = await relay_abuse.dcutr_forged(target, [x.addr for x in listeners], requests=60)
    reached = sum(x.accepted for x in listeners)
    assert reached <= 12, (reached, result)
    assert result["refused"] >= 55, result
    assert await honest_relayed_dial(relay.info["addrs"][0], target) == "ok"
    assert_clean(relay, private)
