"""A peer answers the identify request every node makes on a new connection with a length prefix
that never ends (and sends the same bytes on identify push and the DHT): the daemon drops that
peer's messages and keeps running and serving an honest peer. Before the fix the malformed prefix
escaped read_delimited as a bare ValueError and took the whole daemon down."""

from __future__ import annotations

import trio

from attacks.bad_prefix import bad_prefix_peer
from lattice.testing.daemons import start_daemon, wait_for
from lattice.transport import identify


async def test_bad_length_prefix_does_not_take_the_daemon_down(tmp_path):
    victim = start_daemon(
        tmp_path, "victim", ["--listen", "/ip4/127.0.0.1/tcp/0", "--reachability", "public"]
    )
    try:
        target = victim.info["addrs"][0]
        with trio.fail_after(30):
            report = await bad_prefix_peer(target, [identify.PUSH_ID, "/lattice/kad/1.0.0"], hold=1.0)
        assert report["identify_answered"] >= 1, report  # the victim asked, and got the bad prefix
        assert victim.proc.poll() is None, victim.log()  # still running
        honest = start_daemon(tmp_path, "honest", ["--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", target])
        try:
            # the honest daemon is ready before it reaches its bootstrap peer: wait for it
            await trio.to_thread.run_sync(
                lambda: wait_for(lambda: honest.peer_id in str(victim.call("peers")), 15, "honest peer")
            )
            pong = await trio.to_thread.run_sync(lambda: honest.call("ping", target=target))
            assert pong, pong
        finally:
            honest.stop()
    finally:
        victim.stop()
    assert "Traceback" not in victim.log(), victim.log()
