"""libp2p identify (``/ipfs/id/1.0.0``): exchange public key, listen addresses, protocols, agent.

Both sides request it on every new connection. What the peer says it observed as our address is
counted in ``host.observed_addrs`` (the input to reachability detection).
"""

from __future__ import annotations

import logging
import time

import trio

from lattice import _proto
from lattice.errors import IdentityError, LatticeError, ProtocolError, TransportError
from lattice.identity import PublicKey
from lattice.multiaddr import Multiaddr, MultiaddrError
from lattice.transport.framing import read_delimited
from lattice.transport.host import Connection, Host
from lattice.transport.peerstore import PeerInfo
from lattice.transport.stream import Stream

log = logging.getLogger(__name__)

PROTOCOL_ID = "/ipfs/id/1.0.0"
PUSH_ID = "/ipfs/id/push/1.0.0"  # the same message, sent unasked when our addresses change
MAX_MESSAGE = 64 * 1024
MAX_MESSAGES = 4
MAX_ADDRS = 64
MAX_PROTOCOLS = 256
TIMEOUT = 10.0


def encode(host: Host, observed: Multiaddr | None) -> bytes:
    fields: list[tuple[int, bytes | str | None]] = [
        (5, host.config.protocol_version),
        (6, host.config.agent_version),
    ]
    fields.append((1, host.keypair.public_key.to_protobuf()))
    fields += [(2, a.to_bytes()) for a in host.advertised_addrs()]
    fields.append((4, observed.to_bytes() if observed is not None else None))
    fields += [(3, p) for p in host.protocols]
    return _proto.encode(fields)


def decode(data: bytes, info: PeerInfo) -> Multiaddr | None:
    """Fill ``info`` from an identify message; return the address the peer observed for us."""
    fields = _proto.decode(data, max_fields=MAX_ADDRS + MAX_PROTOCOLS + 16)
    key = _proto.one_bytes(fields, 1)
    if key is not None:
        public_key = PublicKey.from_protobuf(key)
        if public_key.peer_id() != info.peer_id:
            raise ProtocolError("identify public key does not match the connection's peer id")
        info.public_key = public_key
    addrs = []
    for raw in _proto.all_bytes(fields, 2)[:MAX_ADDRS]:
        try:
            addrs.append(Multiaddr.from_bytes(raw))
        except MultiaddrError:
            continue  # an address kind we do not speak (e.g. webrtc): skip it, keep the rest
    info.addrs = addrs
    info.protocols = [p.decode("utf-8", "replace")[:256] for p in _proto.all_bytes(fields, 3)[:MAX_PROTOCOLS]]
    version = _proto.one_bytes(fields, 5)
    agent = _proto.one_bytes(fields, 6)
    info.protocol_version = version.decode("utf-8", "replace")[:256] if version else ""
    info.agent_version = agent.decode("utf-8", "replace")[:256] if agent else ""
    info.last_seen = time.time()
    observed = _proto.one_bytes(fields, 4)
    if observed:
        try:
            return Multiaddr.from_bytes(observed)
        except MultiaddrError:
            return None
    return None


def install(host: Host) -> None:
    async def handler(stream: Stream) -> None:
        conn = host.connection_of(stream)
        observed = conn.remote_addr if conn is not None else None
        message = encode(host, observed)
        await stream.write(_proto.delimited(message))

    async def push_handler(stream: Stream) -> None:
        peer = stream.remote_peer
        try:
            with trio.fail_after(TIMEOUT):
                message = await read_delimited(stream, MAX_MESSAGE)
            if message is None:
                return
            info = host.peerstore.add(peer)
            protocols = info.protocols
            decode(message, info)
            if not info.protocols:  # a push may carry only what changed
                info.protocols = protocols
        except (trio.TooSlowError, _proto.DecodeError, IdentityError, TransportError) as exc:
            log.debug("bad identify push from %s: %s", peer, exc)
            return
        host.peerstore.add_addrs(peer, info.addrs, replace=True)  # capped per peer
        host.identified(peer)

    def on_connect(conn: Connection) -> None:
        host.start_soon(_identify_quietly, host, conn)

    host.set_stream_handler(PROTOCOL_ID, handler)
    host.set_stream_handler(PUSH_ID, push_handler)
    host.on_connect(on_connect)


async def _identify_quietly(host: Host, conn: Connection) -> None:
    try:
        await identify(host, conn)
    except (LatticeError, trio.TooSlowError) as exc:
        log.debug("identify with %s failed: %s", conn.remote_peer, exc)


async def identify(host: Host, conn: Connection) -> PeerInfo:
    """Ask the peer on ``conn`` who it is; update the peerstore and our observed addresses."""
    info = host.peerstore.add(conn.remote_peer)
    with trio.fail_after(TIMEOUT):
        stream = await host.new_stream(conn, [PROTOCOL_ID])
        try:
            merged = bytearray()
            for _ in range(MAX_MESSAGES):
                message = await read_delimited(stream, MAX_MESSAGE)
                if message is None:
                    break
                merged += message  # protobuf: concatenation merges (repeated fields append)
            try:
                observed = decode(bytes(merged), info)
            except (_proto.DecodeError, IdentityError) as exc:
                raise ProtocolError(f"malformed identify message: {exc}") from None
        finally:
            await stream.close()
    host.peerstore.add_addrs(conn.remote_peer, info.addrs, replace=True)  # capped per peer
    if observed is not None:
        host.note_observed(observed)
    host.identified(conn.remote_peer)
    return info


async def push(host: Host) -> int:
    """Tell every connected peer that supports it our current identify info (new addresses after
    a relay reservation or a reachability change); returns how many peers took it."""
    done = 0

    async def push_one(conn: Connection) -> None:
        nonlocal done
        try:
            with trio.fail_after(TIMEOUT):
                stream = await host.new_stream(conn, [PUSH_ID])
                message = encode(host, conn.remote_addr)
                await stream.write(_proto.delimited(message))
                await stream.close()
            done += 1
        except (LatticeError, trio.TooSlowError) as exc:
            log.debug("identify push to %s failed: %s", conn.remote_peer, exc)

    async with trio.open_nursery() as nursery:
        for conn in host.connections():
            info = host.peerstore.get(conn.remote_peer)
            if info is not None and PUSH_ID in info.protocols:
                nursery.start_soon(push_one, conn)
    return done


__all__ = ["PROTOCOL_ID", "PUSH_ID", "TransportError", "identify", "install", "push"]
