"""Relay discovery poisoning against real daemons (issue 16, defect 10): 30 sybils announce the
relay key with a third party's address (a silent listener, no relay), ahead of the one real relay.
A private daemon still reserves on the real relay within seconds, dials the third party once, and
is reachable through the relay.

The sybils and the relay's own announcement name another swarm in identify, which keeps them out of
the DHT node's routing table: the private node then learns of the relay only from the provider
records, as in a DHT too large for it to meet the relay as a neighbour (in a 3-node DHT every node
meets every other, and the private node would find the relay by connecting to it).
"""

from __future__ import annotations

import trio

from attacks import relay_poison
from lattice.identity import load_or_create_key
from lattice.testing.daemons import start_daemon, wait_for

LOOPBACK = ["--listen", "/ip4/127.0.0.1/tcp/0"]
FOREIGN = "lattice/elsewhere/1"


def reserved(daemon) -> list[str]:
    return [r["relay"] for r in daemon.call("status")["nat"]["relays"]]


async def test_sybil_relay_providers_do_not_stop_a_private_node_from_reserving(tmp_path, nursery):
    third = relay_poison.SilentListener()
    await nursery.start(third.run)
    started = []
    try:
        boot = start_daemon(tmp_path, "boot", LOOPBACK)
        started.append(boot)
        relay = start_daemon(tmp_path, "relay", [*LOOPBACK, "--relay"])  # isolated: no bootstrap
        started.append(relay)
        boot_addr = boot.info["addrs"][0]
        poison = await relay_poison.announce(
            boot_addr, relay_poison.RELAY_KEY, relay_poison.sybils(30), third.addr, FOREIGN
        )
        assert poison["announced"] == 30, poison
        relay_key = load_or_create_key(tmp_path / "relay" / "identity.key", create=False)
        real = await relay_poison.announce(
            boot_addr, relay_poison.RELAY_KEY, [relay_key], relay.info["addrs"][0], FOREIGN
        )
        assert real["announced"] == 1, real
        assert boot.call("dht.status")["providers"] == 31

        private = start_daemon(tmp_path, "private", [*LOOPBACK, "--reachability", "private",
                                                     "--bootstrap", boot_addr])  # fmt: skip
        started.append(private)
        # before: the first 16 providers (all sybils) were tried two at a time, 5 s each, then again
        rows = await trio.to_thread.run_sync(wait_for, lambda: reserved(private), 15, "a reservation")
        assert rows == [relay.peer_id]
        await trio.sleep(6.0)  # a third-party attempt under way times out meanwhile
        assert reserved(private) == [relay.peer_id]
        # one dial per address and node (the boot node, not public yet, looks for relays too), not
        # one per sybil: before, 10 dials in 20 s and counting
        assert third.accepted <= 2, third.accepted
        # honest peers reach the private node through the relay it found
        circuit = next(a for a in private.call("status")["addrs"] if "/p2p-circuit" in a)
        assert boot.call("connect", addr=circuit, timeout=10) == private.peer_id
        for daemon in started:
            log = daemon.log()
            assert "Traceback" not in log, log[log.index("Traceback") - 300 :][:4000]
    finally:
        for daemon in started:
            daemon.stop()
