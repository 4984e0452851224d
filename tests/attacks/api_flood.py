"""Hostile HTTP clients of the OpenAI-compatible endpoint (`lattice-node serve-api`).

Each function takes the endpoint's host and port and the source address to connect from (on
loopback, 127.0.0.2 is another client than the honest 127.0.0.1), runs for a while and returns a
dict of what happened, so tests/test_attack_mesh_api.py and bench/attack.py share them.

- ``slow_heads``: many connections that send a request head one line at a time and never finish
  it (slowloris); closed ones are re-opened. Unfixed, 64 of them took every connection the
  endpoint allows, from any address, so honest clients were refused.
- ``held_streams``: streamed generations of the longest allowed length whose replies are never
  read, so each holds a session on every stage server until the generation times out. Unfixed, a
  client could start 4, which is all the sessions a stage server gives the API node.
"""

from __future__ import annotations

import json
from typing import Any

import trio


async def _connect(host: str, port: int, source: str, window: int = 0) -> trio.SocketStream:
    """A connection from ``source``; ``window``: a small receive buffer, so a reply that is not
    read stalls the sender soon (instead of filling megabytes of socket buffers)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        if window:
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, window)
        await sock.bind((source, 0))
        await sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def slow_heads(
    host: str, port: int, connections: int = 80, seconds: float = 4.0, source: str = "127.0.0.2"
) -> dict[str, Any]:
    """Keep ``connections`` unfinished request heads open for ``seconds``; {"attempts",
    "max_open" (connections the endpoint kept open at once), "refused" (closed within half a
    second), "cut" (closed later: the request timeout)}."""
    state = {"attempts": 0, "open": 0, "max_open": 0, "refused": 0, "cut": 0}
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()

    async def alive(stream: trio.SocketStream) -> bool:
        """Half a second without the endpoint closing the connection."""
        with trio.move_on_after(0.5):
            return bool(await stream.receive_some(4096))  # an error reply comes with a close
        return True

    async def one() -> None:
        while True:
            state["attempts"] += 1
            counted = False
            try:
                async with await _connect(host, port, source) as stream:
                    await stream.send_all(head)
                    if not await alive(stream):
                        state["refused"] += 1  # the kernel took the connection, the endpoint closed it
                        continue
                    counted = True
                    state["open"] += 1
                    state["max_open"] = max(state["max_open"], state["open"])
                    while await alive(stream):
                        await stream.send_all(b"X-Slow: 1\r\n")
                    state["cut"] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                state["cut" if counted else "refused"] += 1
            finally:
                if counted:
                    state["open"] -= 1
                await trio.sleep(0.05)

    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(one)
    del state["open"]
    return state


async def held_streams(
    host: str, port: int, model: str, count: int = 6, seconds: float = 4.0, max_tokens: int = 512,
    source: str = "127.0.0.2",
) -> dict[str, Any]:  # fmt: skip
    """Start ``count`` streamed completions at once and read nothing after the status line for
    ``seconds``; {"statuses": [HTTP status of each], "accepted", "refused_429"}."""
    body = json.dumps({"model": model, "prompt": "hold", "max_tokens": max_tokens, "stream": True,
                       "temperature": 0}).encode()  # fmt: skip
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip
    statuses: list[int] = []

    async def one() -> None:
        try:
            async with await _connect(host, port, source, window=4096) as stream:
                await stream.send_all(request)
                first = await stream.receive_some(12)  # "HTTP/1.1 200"
                statuses.append(int(first[9:12]) if first[:5] == b"HTTP/" else 0)
                await trio.sleep(seconds)  # hold the generation: read nothing more
        except (OSError, trio.BrokenResourceError, ValueError):
            statuses.append(0)

    with trio.move_on_after(seconds + 10):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
    return {"statuses": sorted(statuses), "accepted": statuses.count(200), "refused_429": statuses.count(429)}
