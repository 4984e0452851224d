"""Volume attacks on a real daemon's transport (issue 16, defects 2-4); after each, an honest peer
is still served. Loopback sources other than 127.0.0.1 (127.0.x.y) are not exempt from the per-IP
and per-prefix budgets, so they stand in for strangers on other networks."""

from __future__ import annotations

import time

import pytest
import trio

from attacks import transport as T
from lattice.identity import KeyPair
from lattice.testing.daemons import start_daemon
from lattice.transport import open_host, ping


@pytest.fixture
def victim(tmp_path):
    daemon = start_daemon(tmp_path, "victim", ["--listen", "/ip4/127.0.0.1/tcp/0"])
    yield daemon
    daemon.stop()


async def honest_ping(addr: str) -> float:
    """A fresh honest peer connects and pings; the round trip in seconds."""
    async with open_host(KeyPair.generate()) as host:
        with trio.fail_after(10):
            conn = await host.connect(addr)
            (rtt,) = await ping.ping(host, conn.remote_peer, count=1)
    return rtt


def assert_no_traceback(daemon) -> None:
    assert "Traceback" not in daemon.log(), daemon.log()[-3000:]


async def test_replies_that_are_never_read_do_not_pile_up(victim):
    """4 connections x 400 DHT streams asking for 180 KiB of records, replies never read: the
    victim's RSS grew by ~860 MiB before (replies buffered until a 30 s write timeout)."""
    addr = victim.info["addrs"][0]
    await T.store_big_records(addr, KeyPair.generate(), b"/attack/big", 3, 60_000)
    result = await T.no_read_replies(addr, connections=4, streams=400, hold=4.0, victim_pid=victim.proc.pid)
    assert result["requests_sent"] >= 400, result
    assert result["victim_rss_peak_mib"] - result["victim_rss_start_mib"] < 150, result
    assert await honest_ping(addr) < 1.0
    assert_no_traceback(victim)


async def test_churned_connections_leave_no_memory_behind(victim):
    """Before: ~0.14-0.75 MiB of RSS per churned connection that never came back (a 2 MiB receive
    buffer per connection fragmenting the heap)."""
    addr = victim.info["addrs"][0]
    await T.connection_churn(addr, count=200, parallel=16)  # warm up: the first connections allocate
    result = await T.connection_churn(addr, count=1500, parallel=64, victim_pid=victim.proc.pid)
    assert result["connections"] >= 1450, result
    assert result["victim_rss_after_mib"] - result["victim_rss_before_mib"] < 8, result
    assert await honest_ping(addr) < 1.0
    assert_no_traceback(victim)


async def test_silent_handshakes_do_not_lock_out_new_connections(victim):
    """256 sockets from 64 addresses in 16 /24s send /noise and go silent (and come back when
    dropped). Before: 64 of them took every handshake slot and 0 % of new connections got in. The
    attacker's 256 loops share this process's event loop with the honest peer, so on a loaded 2-core
    CI machine one of ~13 honest handshakes can miss its 5 s deadline on our side (seen once: 12/13):
    the bar is 85 %, far from the 0 % of the defect."""
    addr = victim.info["addrs"][0]
    sources = [f"127.0.{p}.{h}" for p in range(1, 17) for h in range(1, 5)]
    started = time.monotonic()
    result = await T.slowloris(addr, sources, per_source=4, hold=6.0, honest_from="127.0.99.1")
    assert result["stalled_sockets"] >= 200, result
    assert result["honest_new_connections"] >= 8, result
    assert result["honest_success"] >= 0.85, result
    assert time.monotonic() - started < 20
    assert await honest_ping(addr) < 1.0
    assert_no_traceback(victim)
