"""The node's small HTTP server: ``/metrics`` (Prometheus), ``/api/state`` (JSON), ``/`` (web page).

Localhost by default (``metrics_listen = "127.0.0.1:PORT"``): it shows who the node talks to, so
exposing it is the operator's explicit choice. HTTP/1.1 GET and HEAD only (parsed and framed by
``h11``), one request per connection, request head bounded (8 KiB, 5 s), at most 32 clients at a
time. On loopback the Host header must name loopback (no DNS rebinding). ``/metrics`` is rendered by
``prometheus_client`` from a registry of this node's own, in the format the scraper asks for.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

import h11
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from lattice.errors import ConfigError
from lattice.observe import metrics, page

__all__ = ["local_host_header", "parse_listen", "serve_http"]

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


def _response(
    conn: h11.Connection, status: int, body: bytes, content_type: str, head_only: bool = False
) -> bytes:
    """The whole response (one request per connection), framed by h11."""
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        ("Connection", "close"),
        *_SECURITY_HEADERS,
    ]
    out = conn.send(h11.Response(status_code=status, reason=HTTPStatus(status).phrase, headers=headers))
    if body and not head_only:
        out += conn.send(h11.Data(data=body))
    return out + conn.send(h11.EndOfMessage())


# The page loads only its own files and talks only to this server (a stray peer string cannot run
# script even if it ever reached the markup).
_SECURITY_HEADERS = [
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
]


def _route(node: Any, registry: CollectorRegistry, request: h11.Request) -> tuple[int, bytes, str]:
    """(status, body, content type) for one GET."""
    path = request.target.decode("ascii", "replace").split("?", 1)[0]
    if path == "/metrics":
        encoder, content_type = choose_encoder(_header(request, b"accept") or "")
        return 200, encoder(registry), content_type
    if path == "/api/state":
        return 200, json.dumps(metrics.snapshot(node), default=str).encode(), "application/json"
    asset = page.asset(path)
    if asset is not None:
        return 200, *asset
    return 404, b"not found\n", "text/plain"


def _header(request: h11.Request, name: bytes) -> str | None:
    for key, value in request.headers:
        if key == name:
            return value.decode("latin-1")
    return None


_LOCAL_NAMES = {"127.0.0.1", "localhost", "[::1]", "::1"}


def local_host_header(host: str | None) -> bool:
    """Served on loopback, the Host header must name loopback too: a web page of another site
    that re-points its own name at 127.0.0.1 (DNS rebinding) then cannot read the node's state."""
    if host is None:
        return True  # HTTP/1.0 without Host: not a browser (h11 requires Host on HTTP/1.1)
    host = host.strip()
    host = host.rsplit(":", 1)[0] if not host.endswith("]") and host.count(":") == 1 else host
    if host.startswith("[") and "]:" in host:
        host = host.split("]:", 1)[0] + "]"
    return host.lower() in _LOCAL_NAMES


def _next_request(conn: h11.Connection) -> h11.Request | int | None:
    """The request once its head is complete, an error status for a malformed one, None for more bytes."""
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        return exc.error_status_hint
    if isinstance(event, h11.Request):
        return event
    return None if event is h11.NEED_DATA else 400


def _reply(node: Any, registry: CollectorRegistry, conn: h11.Connection, outcome: h11.Request | int,
           local_only: bool) -> bytes:  # fmt: skip
    """The bytes to send for a parsed request or a parse error."""
    if isinstance(outcome, int):
        return _response(conn, outcome, f"{HTTPStatus(outcome).phrase.lower()}\n".encode(), "text/plain")
    if outcome.method not in (b"GET", b"HEAD"):
        return _response(conn, 405, b"only GET\n", "text/plain")
    if local_only and not local_host_header(_header(outcome, b"host")):  # DNS rebinding: a page of
        return _response(conn, 403, b"forbidden\n", "text/plain")  # another site
    status, body, content_type = _route(node, registry, outcome)
    return _response(conn, status, body, content_type, head_only=outcome.method == b"HEAD")


async def _handle(node: Any, registry: CollectorRegistry, stream: trio.SocketStream, slots: trio.Semaphore,
                  local_only: bool) -> None:  # fmt: skip
    if slots.value == 0:
        await trio.aclose_forcefully(stream)
        return
    async with slots:
        try:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
            received = 0
            with trio.fail_after(HEAD_TIMEOUT):
                while (outcome := _next_request(conn)) is None:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    received += len(chunk)
                    if received > MAX_HEAD:  # h11 bounds an incomplete head; this bounds a complete one
                        outcome = 431
                        break
                    conn.receive_data(chunk)
            reply = _reply(node, registry, conn, outcome, local_only)
            with trio.fail_after(HEAD_TIMEOUT * 2):
                await stream.send_all(reply)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:  # a bug in one page must not take the node down
            log.exception("HTTP request failed")
        finally:
            await trio.aclose_forcefully(stream)


async def serve_http(
    node: Any, listen: str, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
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
    registry = metrics.registry(lambda: metrics.snapshot(node))
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept, node, registry, listener, slots, local_only, nursery)
        task_status.started(url)


async def _accept(node: Any, registry: CollectorRegistry, listener: trio.SocketListener,
                  slots: trio.Semaphore, local_only: bool, nursery: trio.Nursery) -> None:  # fmt: skip
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                log.warning("metrics accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(_handle, node, registry, stream, slots, local_only)
