"""The node's small HTTP server: ``/metrics`` (Prometheus), ``/api/state`` (JSON), ``/`` (web page).

Localhost by default (``metrics_listen = "127.0.0.1:PORT"``): it shows who the node talks to, so
exposing it is the operator's explicit choice. HTTP/1.1 GET and HEAD only, one request per
connection, request head bounded (8 KiB, 5 s), at most 32 clients at a time. On loopback the Host
header must name loopback (no DNS rebinding).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import trio

from lattice.errors import ConfigError

__all__ = ["parse_listen", "serve_http"]

log = logging.getLogger(__name__)

MAX_HEAD = 8192
HEAD_TIMEOUT = 5.0
MAX_CLIENTS = 32


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"metrics_listen {text!r} must be HOST:PORT, e.g. 127.0.0.1:9090")
    return host, int(port)


def _response(status: str, body: bytes, content_type: str, head_only: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + body


def _route(node: Any, method: str, path: str) -> bytes:
    from lattice.observe import metrics, page

    path = path.split("?", 1)[0]
    head_only = method == "HEAD"
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", b"only GET\n", "text/plain")
    if path == "/metrics":
        text = metrics.prometheus(metrics.snapshot(node)).encode()
        return _response("200 OK", text, "text/plain; version=0.0.4; charset=utf-8", head_only)
    if path == "/api/state":
        body = json.dumps(metrics.snapshot(node), default=str).encode()
        return _response("200 OK", body, "application/json", head_only)
    if path in ("/", "/index.html"):
        return _response("200 OK", page.HTML.encode(), "text/html; charset=utf-8", head_only)
    return _response("404 Not Found", b"not found\n", "text/plain", head_only)


_LOCAL_NAMES = {"127.0.0.1", "localhost", "[::1]", "::1"}


def _local_host_header(headers: list[str]) -> bool:
    """Served on loopback, the Host header must name loopback too: a web page of another site
    that re-points its own name at 127.0.0.1 (DNS rebinding) then cannot read the node's state."""
    for line in headers:
        name, _, value = line.partition(":")
        if name.strip().lower() == "host":
            host = value.strip()
            host = host.rsplit(":", 1)[0] if not host.endswith("]") and host.count(":") == 1 else host
            if host.startswith("[") and "]:" in host:
                host = host.split("]:", 1)[0] + "]"
            return host.lower() in _LOCAL_NAMES
    return True  # HTTP/1.0 without Host: not a browser


async def _handle(node: Any, stream: trio.SocketStream, slots: trio.Semaphore, local_only: bool) -> None:
    if slots.value == 0:
        await trio.aclose_forcefully(stream)
        return
    async with slots:
        try:
            buf = bytearray()
            with trio.fail_after(HEAD_TIMEOUT):
                while b"\r\n\r\n" not in buf:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    buf += chunk
                    if len(buf) > MAX_HEAD:
                        await stream.send_all(
                            _response("431 Request Header Fields Too Large", b"", "text/plain")
                        )
                        return
            lines = bytes(buf).split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            parts = lines[0].split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                await stream.send_all(_response("400 Bad Request", b"bad request\n", "text/plain"))
                return
            if local_only and not _local_host_header(lines[1:]):  # DNS rebinding: a page of another
                await stream.send_all(_response("403 Forbidden", b"forbidden\n", "text/plain"))  # site
                return
            reply = _route(node, parts[0], parts[1])
            with trio.fail_after(HEAD_TIMEOUT * 2):
                await stream.send_all(reply)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:  # a bug in one page must not take the node down
            log.exception("HTTP request failed")
        finally:
            await trio.aclose_forcefully(stream)


async def serve_http(node: Any, listen: str, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; ``task_status.started(url)`` once bound."""
    host, port = parse_listen(listen)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None
    bound = listeners[0].socket.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    url = f"http://{shown}:{bound[1]}/"
    local_only = host in ("127.0.0.1", "::1", "localhost")
    if not local_only:
        log.warning("metrics and web page served on %s: reachable beyond this machine", url)
    slots = trio.Semaphore(MAX_CLIENTS)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept, node, listener, slots, local_only, nursery)
        task_status.started(url)


async def _accept(node: Any, listener: trio.SocketListener, slots: trio.Semaphore, local_only: bool,
                  nursery: trio.Nursery) -> None:  # fmt: skip
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                log.warning("metrics accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(_handle, node, stream, slots, local_only)
