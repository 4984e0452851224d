"""A peer whose delimited messages start with a length prefix that never ends (11 varint
continuation bytes): it connects to the victim and answers the identify request every node sends on
a new connection with that prefix, and sends the same bytes as a pushed identify and on the DHT
protocol. Found by the property tests of ``read_delimited`` (tests/test_properties_wire.py).

Used by ``tests/test_attack_bad_prefix.py``.
"""

from __future__ import annotations

__all__ = ["BAD_PREFIX", "bad_prefix_peer"]

BAD_PREFIX = b"\xff" * 11 + b"\x01"  # a uvarint longer than any 64-bit value


async def bad_prefix_peer(target: str, protocols: list[str], hold: float = 1.0) -> dict:
    """Connect to ``target`` (a multiaddr with /p2p/), answer its identify with ``BAD_PREFIX`` and
    open a stream with it on each of ``protocols``; stay connected ``hold`` seconds. Returns what
    happened: which streams were opened and whether the connection was still up at the end."""
    import trio

    from lattice.errors import LatticeError
    from lattice.identity import KeyPair
    from lattice.transport import identify, open_host

    out: dict = {"identify_answered": 0, "streams_sent": [], "stream_errors": [], "connected_at_end": False}
    async with open_host(KeyPair.generate()) as host:

        async def answer(stream) -> None:
            out["identify_answered"] += 1
            await stream.write(BAD_PREFIX)
            await stream.close()

        host.set_stream_handler(identify.PROTOCOL_ID, answer)  # in place of the honest answer
        conn = await host.connect(target, timeout=5)
        for proto in protocols:
            try:
                with trio.fail_after(5):
                    stream = await host.new_stream(conn, [proto])
                    await stream.write(BAD_PREFIX)
                    await stream.close()
                out["streams_sent"].append(proto)
            except (LatticeError, trio.TooSlowError) as exc:
                out["stream_errors"].append(f"{proto}: {exc}")
        await trio.sleep(hold)
        out["connected_at_end"] = host.connection_to(conn.remote_peer) is not None
    return out
