"""Relay discovery poisoning (issue 16, defect 10): sybils announce themselves as providers of the
relay key with a third party's address. Unfixed, a private node took the first 16 providers the
DHT listed, tried each as a relay one after another (a silent third party costs a 5 s handshake
timeout each), never reached the real relay listed after them, and kept dialing the third party.

- :func:`announce`: ADD_PROVIDER of ``key`` from each identity, claiming ``addr`` (a peer may only
  announce itself, so each identity is its own host);
- :class:`SilentListener`: the third party, a plain TCP listener that accepts and says nothing.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import trio

from lattice import _proto
from lattice.dht import protocol
from lattice.errors import LatticeError
from lattice.identity import KeyPair
from lattice.multiaddr import Multiaddr
from lattice.transport import HostConfig, open_host

DEFAULT_PROTOCOL = "/lattice/kad/1.0.0"
RELAY_KEY = b"/lattice/relays"


async def announce(
    dht_node: str,
    key: bytes,
    keypairs: list[KeyPair],
    addr: str,
    protocol_version: str = "lattice/1.0.0",
    protocol_id: str = DEFAULT_PROTOCOL,
) -> dict[str, Any]:
    """Each of ``keypairs`` tells the DHT node at ``dht_node`` that it provides ``key`` at ``addr``.
    ``protocol_version``: what the announcers say in identify (another swarm's keeps them out of the
    node's routing table, so the records are all the network learns of them)."""
    out: dict[str, Any] = {"attack": "relay_poison", "announced": 0, "errors": 0}
    claimed = [Multiaddr.parse(addr).without_peer()]
    for keypair in keypairs:
        try:
            async with open_host(keypair, HostConfig(protocol_version=protocol_version)) as host:
                with trio.fail_after(10):
                    conn = await host.connect(dht_node)
                    await host.wait_identified(conn.remote_peer)
                    await trio.sleep(0.05)  # its identify of us (what its swarm guard reads) too
                    stream = await host.new_stream(conn, [protocol_id])
                    entry = protocol.PeerEntry(keypair.peer_id, claimed)
                    message = protocol.Message(protocol.ADD_PROVIDER, key, providers=[entry])
                    await stream.write(_proto.delimited(protocol.encode(message)), fin=True)
                    await trio.sleep(0.05)  # ADD_PROVIDER has no reply: let it land before closing
            out["announced"] += 1
        except (LatticeError, trio.TooSlowError, OSError):
            out["errors"] += 1
    return out


def sybils(count: int) -> list[KeyPair]:
    return [KeyPair.generate() for _ in range(count)]


class SilentListener:
    """A third party: accepts TCP connections, counts them, never sends a byte; with ``reset``, it
    resets each one at once (a closed port, but countable)."""

    def __init__(self, reset: bool = False) -> None:
        self.accepted = 0
        self.addr = ""
        self.reset = reset
        self._socks: list = []

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        self.addr = f"/ip4/127.0.0.1/tcp/{port}"
        task_status.started()
        try:
            while True:
                stream = await listeners[0].accept()
                self.accepted += 1
                if self.reset:
                    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    stream.socket.close()
                else:
                    self._socks.append(stream)
        finally:
            for stream in self._socks:
                stream.socket.close()
            listeners[0].socket.close()


__all__ = ["RELAY_KEY", "SilentListener", "announce", "sybils"]
