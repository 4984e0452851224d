"""Gossipsub floods against a real node's ``/meshsub/1.1.0`` (issue 16, "not tried yet"): PRUNEs
naming thousands of random topics with huge backoffs, subscriptions to thousands of topics, IHAVEs
of ids that are never delivered, and IWANTs asking for the whole message cache over and over.

:func:`gossip_flood` returns what it sent and, if given the victim's pid, its RSS before and after.
"""

from __future__ import annotations

import os
import time

import trio

from lattice import _proto
from lattice.identity import KeyPair
from lattice.pubsub import protocol
from lattice.pubsub.protocol import RPC
from lattice.transport import HostConfig, open_host

from .transport import rss_mib


async def gossip_flood(
    target: str, topic: str, rpcs: int = 400, seconds: float = 5.0, victim_pid: int | None = None
) -> dict:
    """Send ``rpcs`` hostile RPCs (each: 4,000 PRUNEs, 1,000 subscriptions, 10 IHAVEs of 400 ids,
    an IWANT of 2,000 ids) over ``seconds``, reading whatever the victim answers."""
    before = rss_mib(victim_pid) if victim_pid else None
    sent = received = 0
    reset = False
    async with open_host(KeyPair.generate(), HostConfig()) as host:
        conn = await host.connect(target)
        stream = await host.new_stream(conn, [protocol.PROTOCOL_ID])

        async def drain() -> None:
            nonlocal received
            try:
                while await stream.read(1 << 16):
                    received += 1
            except Exception:  # the victim reset our stream: it may, it is a flood
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            tag = os.urandom(4).hex()
            for n in range(rpcs):
                rpc = RPC(
                    subscriptions=[(True, topic)] + [(True, f"junk/{tag}/{n}/{i}") for i in range(1000)],
                    prune=[(f"prune/{tag}/{n}/{i}", 1 << 62) for i in range(4000)],
                    ihave=[(topic, [os.urandom(20) for _ in range(400)]) for _ in range(10)],
                    iwant=[os.urandom(20) for _ in range(2000)],
                )
                raw = protocol.encode(rpc)
                if len(raw) > protocol.MAX_RPC:
                    raise AssertionError("the hostile RPC must stay within the 1 MiB limit")
                try:
                    await stream.write(_proto.delimited(raw))
                except Exception:
                    reset = True
                    break  # the victim cut us off: fine
                sent += 1
                await trio.sleep(seconds / rpcs)
            nursery.cancel_scope.cancel()
    out: dict = {"rpcs_sent": sent, "reads": received, "reset_by_victim": reset}
    if victim_pid:
        await trio.sleep(1.0)
        out.update(
            victim_rss_before_mib=round(before or 0, 1), victim_rss_after_mib=round(rss_mib(victim_pid), 1)
        )
    out["at"] = time.time()
    return out
