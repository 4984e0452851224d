"""A lying AutoNAT server against a real daemon (issue 16, defect 12): it dials back genuinely but
names a third party's address. The daemon never advertises that address (status, identify), and
honest servers on two other IP prefixes still confirm its real one."""

from __future__ import annotations

import trio

from attacks import autonat_rogue
from lattice.identity import KeyPair
from lattice.nat.autonat import PUBLIC, AutoNAT
from lattice.testing.daemons import start_daemon, wait_for
from lattice.transport import open_host

FORGED = "/ip4/198.51.100.7/tcp/4001"  # a third party's address (TEST-NET-2)


async def poll(check, timeout: float, what: str):
    """wait_for in a thread: the rogue server keeps answering on this loop meanwhile."""
    return await trio.to_thread.run_sync(wait_for, check, timeout, what)


async def identified_addrs(addr: str) -> list[str]:
    """The addresses the daemon tells a fresh peer in identify."""
    async with open_host(KeyPair.generate()) as host:
        with trio.fail_after(10):
            conn = await host.connect(addr)
            info = await host.wait_identified(conn.remote_peer)
    return [str(a) for a in info.addrs]


async def test_a_lying_autonat_server_cannot_make_the_daemon_advertise_a_third_partys_address(tmp_path):
    victim = start_daemon(tmp_path, "victim", ["--listen", "/ip4/127.0.0.1/tcp/0"])
    honest = []
    try:
        addr = victim.info["addrs"][0]
        real = addr.split("/p2p/")[0]
        result = {}

        async def rogue() -> None:
            result.update(await autonat_rogue.rogue_server(addr, FORGED, hold=4.0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(rogue)
            detected = lambda: victim.call("status")["nat"]["detected"]  # noqa: E731
            # the genuine dial-back proves reachability, but one prefix does not confirm an address
            await poll(lambda: detected()["reachability"] == PUBLIC, 10, "a check answered by the rogue")
            assert FORGED not in detected()["public_addrs"]
            assert all(FORGED not in a for a in victim.call("status")["addrs"])
            assert all(FORGED not in a for a in await identified_addrs(addr))
        assert result["dialed_back"] >= 1 and result["forged_answers"] >= 1, result

        # honest servers on two other prefixes (the daemon dials them there) confirm the real address
        for i, ip in enumerate(("127.0.2.1", "127.0.3.1")):
            honest.append(start_daemon(tmp_path, f"honest{i}", ["--listen", f"/ip4/{ip}/tcp/0"]))
            victim.call("connect", addr=honest[-1].info["addrs"][0])
        await poll(lambda: detected()["public_addrs"] == [real], 15, "the real address confirmed")
        assert all(FORGED not in a for a in victim.call("status")["addrs"])
        assert all(FORGED not in a for a in await identified_addrs(addr))
        assert "Traceback" not in victim.log()
    finally:
        for daemon in [*honest, victim]:
            daemon.stop()


async def test_an_address_that_was_never_asked_for_is_rejected(host_factory, nursery):
    victim = await host_factory()
    nat = AutoNAT(victim, dial_timeout=2.0)
    nat.install()
    nursery.start_soon(nat.run)
    addr = str(victim.listen_addrs[0].with_peer(victim.peer_id))
    result = await autonat_rogue.rogue_server(addr, FORGED, hold=3.0, lie_in_identify=False)
    assert result["forged_answers"] >= 1, result
    assert not nat.public_addrs and nat.reachability != PUBLIC  # before: the forged address, public
    assert nat.rejected >= 1
