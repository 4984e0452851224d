"""AutoNAT on real loopback hosts: a settled node stops checking (no self-sustaining dial-back storm)."""

from __future__ import annotations

import trio

from conftest import full_addr
from lattice.nat.autonat import PUBLIC, AutoNAT


async def test_checks_stop_once_reachability_is_known(host_factory, nursery):
    hosts = [await host_factory() for _ in range(4)]
    nats = [AutoNAT(h, dial_timeout=2.0, per_peer_interval=0.0) for h in hosts]
    for nat in nats:
        nat.install()
        nursery.start_soon(nat.run)
    for i, h in enumerate(hosts[:3]):  # a triangle: every node can ask two servers
        for other in hosts[i + 1 : 3]:
            await h.connect(full_addr(other))
    with trio.fail_after(15):
        while any(n.reachability != PUBLIC for n in nats[:3]):
            await trio.sleep(0.1)
    await trio.sleep(1.0)  # the confirming check after a change
    before = [n.checks for n in nats[:3]]
    # new connections: each one reports another observed port of the same IP
    for h in hosts[:3]:
        await hosts[3].connect(full_addr(h))
    await trio.sleep(3.0)
    grown = [n.checks - b for n, b in zip(nats[:3], before, strict=True)]
    # before the fix, every dial-back's identify woke the next check: dozens in 3 s
    assert max(grown) <= 1, grown
    assert all(n.reachability == PUBLIC for n in nats[:3])
