"""An OpenAI-compatible HTTP endpoint on a client node: ``/v1/completions``,
``/v1/chat/completions`` (both with ``stream``), ``/v1/models``.

The node is a thin client (:class:`~lattice.apps.mesh_inference.client.MeshClient`): the model's
card and tokenizer come from the stage servers. HTTP/1.1 through ``h11``, one request per
connection. Everything a caller can make us spend is bounded (:class:`ApiLimits`): body bytes,
prompt and completion tokens, generations at once in all and per client (its API key, else its
address), connections, and the time to send a request. Loopback by default; another address needs
an API key. On loopback the Host header must name loopback and a POST must say
``application/json``, so a web page the user visits can neither read replies (DNS rebinding) nor
send a form that starts a generation.

Request parsing, the streamed text (stop strings, split UTF-8) and the replies are pure functions;
:class:`ApiServer` does the IO.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast

import h11
import trio

from lattice.apps.mesh_inference.card import ModelCard
from lattice.apps.mesh_inference.client import MeshClient
from lattice.apps.mesh_inference.errors import MeshError, NoChainError, RequestTooLarge
from lattice.apps.mesh_inference.sampling import Sampling
from lattice.apps.mesh_inference.tokenizer import format_chat
from lattice.errors import ConfigError, LatticeError
from lattice.observe.http import local_host_header, parse_listen
from lattice.observe.inert import inert
from lattice.rpc import RemoteError

__all__ = ["ApiError", "ApiLimits", "ApiServer", "TextStream", "parse_request"]

log = logging.getLogger(__name__)

MAX_HEAD = 8192
MAX_MESSAGES = 64
MAX_STOP = 4
MAX_STOP_CHARS = 64
ROLES = ("system", "user", "assistant")


@dataclass
class ApiLimits:
    """What one HTTP client can make the endpoint spend (docs/operators.md, "OpenAI endpoint")."""

    max_body: int = 1 << 20  # request body bytes (a prompt of ~250k tokens at most)
    max_tokens: int = 512  # completion tokens one request may ask for
    default_max_tokens: int = 16  # when a request names none (OpenAI's default for completions)
    max_prompt_tokens: int = 4096  # prompt tokens (and never more than the model's context)
    # generations at once: each holds a session on every stage server of its chain, and the stage
    # servers give one peer (this node) 4 sessions by default (their --max-sessions-per-peer)
    max_sessions: int = 4
    max_sessions_per_client: int = 2  # ... of one client: its API key, else its IP address
    max_connections: int = 64  # open HTTP connections ...
    max_connections_per_ip: int = 16  # ... and from one address (a slow sender cannot take them all)
    request_timeout: float = 10.0  # seconds to send the request head and body
    generation_timeout: float = 600.0  # seconds one generation may take

    def __post_init__(self) -> None:
        if min(self.max_body, self.max_tokens, self.default_max_tokens, self.max_prompt_tokens,
               self.max_sessions, self.max_sessions_per_client, self.max_connections,
               self.max_connections_per_ip) < 1:  # fmt: skip
            raise ConfigError("API limits must be >= 1")
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens)


class ApiError(Exception):
    """A request refused with an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class Request:
    """A validated completion request: the prompt (text or token ids), limits, sampling."""

    chat: bool
    prompt: str | list[int]
    max_tokens: int
    sampling: Sampling
    stream: bool
    stop: list[str] = field(default_factory=list)
    include_usage: bool = False


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if type(value) not in (int, float) or not low <= value <= high:
        raise ApiError(400, f"{name} must be a number in {low}..{high}", param=name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if type(value) is not int or not low <= value <= high:
        raise ApiError(400, f"{name} must be an integer in {low}..{high}", param=name)
    return value


def _text_content(content: Any) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise ApiError(400, "message content must be text", param="messages")


def parse_request(body: Any, chat: bool, card: ModelCard, limits: ApiLimits) -> Request:
    """Validate a /v1/completions or /v1/chat/completions body (ApiError names the bad field)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    if body.get("model") != card.model_id:
        name = inert(str(body.get("model")))[:80]
        raise ApiError(404, f"model {name!r} is not served here (this endpoint serves {card.model_id})",
                       "not_found_error", "model")  # fmt: skip
    for name, allowed in (("n", (None, 1)), ("best_of", (None, 1)), ("echo", (None, False)),
                          ("logprobs", (None, False)), ("suffix", (None,)), ("frequency_penalty", (None, 0)),
                          ("presence_penalty", (None, 0)), ("logit_bias", (None, {}))):  # fmt: skip
        if body.get(name) not in allowed:
            raise ApiError(400, f"{name} is not supported here", param=name)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
            raise ApiError(400, f"messages must be a list of 1..{MAX_MESSAGES} messages", param="messages")
        turns = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise ApiError(400, f"each message needs a role ({', '.join(ROLES)})", param="messages")
            turns.append((m["role"], _text_content(m.get("content"))))
        if card.chat is None:
            raise ApiError(400, f"{card.model_id} has no chat format; use /v1/completions")
        prompt: str | list[int] = format_chat(turns, card.chat)
    else:
        raw = body.get("prompt")
        if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str | list):
            raw = raw[0]
        ids_ok = isinstance(raw, list) and raw and all(type(t) is int and 0 <= t < card.config.vocab_size
                                                       for t in raw)  # fmt: skip
        if (isinstance(raw, str) and raw) or ids_ok:
            prompt = cast("str | list[int]", raw)
        else:
            raise ApiError(400, "prompt must be a non-empty string or a list of token ids (one prompt)",
                           param="prompt")  # fmt: skip
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, limits.default_max_tokens, 1, limits.max_tokens)
    assert max_tokens is not None
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if (not isinstance(stops, list) or len(stops) > MAX_STOP
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):  # fmt: skip
        raise ApiError(400, f"stop must be a string or a list of up to {MAX_STOP} strings of at most "
                            f"{MAX_STOP_CHARS} characters", param="stop")  # fmt: skip
    try:
        sampling = Sampling(
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
            top_k=_integer(body, "top_k", 0, 0, card.config.vocab_size) or 0,
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 10.0),
            seed=_integer(body, "seed", None, 0, (1 << 63) - 1),
        )
    except ConfigError as exc:
        raise ApiError(400, str(exc)) from None
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if type(stream) is not bool or not isinstance(options, dict):
        raise ApiError(400, "stream must be a boolean and stream_options an object", param="stream")
    return Request(chat, prompt, max_tokens, sampling, stream, stops, bool(options.get("include_usage")))


class TextStream:
    """Generated tokens -> text deltas: holds back an incomplete UTF-8 character and what may be
    the start of a stop string; ``stopped`` once a stop string appeared (the text ends before it)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]) -> None:
        self.decode, self.stops = decode, stops
        self.tokens: list[int] = []
        self.sent = ""  # text given out so far
        self.stopped = False
        self._hold = max((len(s) for s in stops), default=1) - 1

    def push(self, token: int) -> str:
        self.tokens.append(token)
        return self._delta(final=False)

    def finish(self) -> str:
        return self._delta(final=True) if not self.stopped else ""

    def _delta(self, final: bool) -> str:
        text = self.decode(self.tokens)
        if not final:
            text = text.rstrip("\ufffd")  # a character whose bytes have not all arrived
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        elif not final and self._hold:
            text = text[: max(len(self.sent), len(text) - self._hold)]
        if not text.startswith(self.sent):  # the decoder revised earlier text: wait for it to settle
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


@dataclass
class _Reply:
    """The pieces of one completion reply (the same for streamed and whole replies)."""

    request: Request
    model: str
    id: str = field(default_factory=lambda: "cmpl-" + secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))

    def chunk(self, text: str, finish: str | None, first: bool = False) -> dict:
        if self.request.chat:
            delta: dict = (
                {"role": "assistant", "content": text} if first else {"content": text} if text else {}
            )
            choice: dict = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice, kind = (
                {"index": 0, "text": text, "logprobs": None, "finish_reason": finish},
                "text_completion",
            )
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def whole(self, text: str, finish: str, usage: dict) -> dict:
        if self.request.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}  # fmt: skip
            kind = "chat.completion"
        else:
            choice, kind = (
                {"index": 0, "text": text, "logprobs": None, "finish_reason": finish},
                "text_completion",
            )
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage}  # fmt: skip

    def usage_chunk(self, usage: dict) -> dict:
        kind = "chat.completion.chunk" if self.request.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [],
                "usage": usage}  # fmt: skip


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ApiServer:
    """Serves the OpenAI API for ``client``'s model (see the module doc)."""

    def __init__(
        self, client: MeshClient, limits: ApiLimits | None = None, api_key: str | None = None
    ) -> None:
        self.client = client
        self.limits = limits or ApiLimits()
        self.api_key = api_key
        self.local_only = True
        self._active: Counter[str] = Counter()  # generations per client
        self._connections: Counter[str] = Counter()  # open connections per address
        self.stats = {"requests": 0, "refused": 0, "completed": 0, "tokens": 0, "errors": 0}

    async def serve(self, listen: str, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started(url)`` once bound. A non-loopback address
        needs an API key."""
        try:
            host, port = parse_listen(listen)
        except ConfigError:
            raise ConfigError(f"--http {listen!r} must be HOST:PORT, e.g. 127.0.0.1:8000") from None
        self.local_only = host in ("127.0.0.1", "::1", "localhost")
        if not self.local_only and not self.api_key:
            raise ConfigError(f"serving the API on {listen} (beyond this machine) needs an API key")
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise ConfigError(f"cannot serve the API on {listen}: {exc.strerror or exc}") from None
        bound = listeners[0].socket.getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept, listener, nursery)
            task_status.started(f"http://{shown}:{bound[1]}/v1")

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    log.warning("API accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                try:
                    peer = str(stream.socket.getpeername()[0])
                except OSError:
                    peer = "?"
                if (sum(self._connections.values()) >= self.limits.max_connections
                        or self._connections[peer] >= self.limits.max_connections_per_ip):  # fmt: skip
                    await trio.aclose_forcefully(stream)
                    self.stats["refused"] += 1
                    continue
                self._connections[peer] += 1
                nursery.start_soon(self._connection, stream, peer)

    async def _connection(self, stream: trio.SocketStream, peer: str) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            try:
                with trio.fail_after(self.limits.request_timeout):
                    request, body = await self._read_request(stream, conn)
            except ApiError as exc:
                self.stats["refused"] += 1
                await _send(stream, _whole(conn, exc.status, exc.body()))
                return
            await self._dispatch(stream, conn, request, body, peer)
        except (
            trio.TooSlowError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            OSError,
            h11.ProtocolError,
        ):
            pass
        except Exception:  # a bug in one request must not take the endpoint down
            self.stats["errors"] += 1
            log.exception("API request failed")
        finally:
            self._connections[peer] -= 1
            if self._connections[peer] <= 0:
                del self._connections[peer]
            await trio.aclose_forcefully(stream)

    async def _read_request(
        self, stream: trio.SocketStream, conn: h11.Connection
    ) -> tuple[h11.Request, bytes]:
        """The request and its body, each bounded (head MAX_HEAD, body max_body)."""
        request, body, received = None, bytearray(), 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise ApiError(exc.error_status_hint, "malformed HTTP request") from None
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                received += len(data)
                if not data:
                    raise trio.BrokenResourceError("the client closed the connection")
                if request is None and received > MAX_HEAD:
                    raise ApiError(431, "request head too large")
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
                length = _header(event, b"content-length")
                if length is not None and (not length.isdigit() or int(length) > self.limits.max_body):
                    raise ApiError(413, f"the body may be at most {self.limits.max_body} bytes")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.limits.max_body:
                    raise ApiError(413, f"the body may be at most {self.limits.max_body} bytes")
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, bytes(body)
            else:
                raise ApiError(400, "malformed HTTP request")

    def _client_of(self, request: h11.Request, peer: str) -> str:
        """Whom a request counts against: its API key (checked), else its address."""
        if self.api_key is None:
            return peer
        auth = _header(request, b"authorization") or ""
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(
                401, "a valid API key is needed (Authorization: Bearer ...)", "authentication_error"
            )
        return "key:" + self.api_key

    async def _dispatch(self, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request,
                        raw: bytes, peer: str) -> None:  # fmt: skip
        self.stats["requests"] += 1
        try:
            if self.local_only and not local_host_header(_header(request, b"host")):
                raise ApiError(403, "the Host header must name this machine", "permission_error")
            path = request.target.decode("ascii", "replace").split("?", 1)[0].rstrip("/")
            client = self._client_of(request, peer)
            if path == "/v1/models":
                if request.method != b"GET":
                    raise ApiError(405, "use GET")
                card = await self._card()
                body = {"object": "list", "data": [{"id": card.model_id, "object": "model", "created": 0,
                                                    "owned_by": "lattice-mesh"}]}  # fmt: skip
                await _send(stream, _whole(conn, 200, body))
                return
            if path not in ("/v1/completions", "/v1/chat/completions"):
                raise ApiError(404, f"no route {inert(path)[:100]}", "not_found_error")
            if request.method != b"POST":
                raise ApiError(405, "use POST")
            if (_header(request, b"content-type") or "").split(";")[0].strip().lower() != "application/json":
                raise ApiError(415, "the body must be application/json")
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise ApiError(400, "the body is not valid JSON") from None
            card = await self._card()
            req = parse_request(body, path.endswith("/chat/completions"), card, self.limits)
            with self._session_slot(client):
                await self._complete(stream, conn, req, card)
        except ApiError as exc:
            self.stats["refused"] += 1
            if conn.our_state is h11.SEND_RESPONSE:
                await _send(stream, _whole(conn, exc.status, exc.body()))

    async def _card(self) -> ModelCard:
        try:
            return await self.client.model_card()
        except LatticeError as exc:
            raise ApiError(503, f"the mesh cannot serve {self.client.model_id}: {inert(str(exc))}",
                           "service_unavailable") from None  # fmt: skip

    def _session_slot(self, client: str) -> _Slot:
        if sum(self._active.values()) >= self.limits.max_sessions:
            raise ApiError(429, f"the endpoint runs {self.limits.max_sessions} generations; try again later",
                           "rate_limit_error")  # fmt: skip
        if self._active[client] >= self.limits.max_sessions_per_client:
            raise ApiError(429, f"a client may run {self.limits.max_sessions_per_client} generations at once",
                           "rate_limit_error")  # fmt: skip
        return _Slot(self._active, client)

    async def _prompt_ids(self, req: Request, card: ModelCard) -> tuple[list[int], Any]:
        tokenizer = await self._tokenizer()
        if isinstance(req.prompt, str):
            ids = (await trio.to_thread.run_sync(tokenizer.encode, req.prompt)).ids
        else:
            ids = list(req.prompt)
        room = min(self.limits.max_prompt_tokens, card.config.max_positions - req.max_tokens)
        if not ids:
            raise ApiError(400, "the prompt has no tokens", param="prompt")
        if len(ids) > room:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; at most {room} fit with max_tokens "
                                f"{req.max_tokens}", param="prompt")  # fmt: skip
        return ids, tokenizer

    async def _tokenizer(self) -> Any:
        try:
            return await self.client.tokenizer()
        except LatticeError as exc:
            raise ApiError(503, f"no tokenizer for {self.client.model_id}: {inert(str(exc))}",
                           "service_unavailable") from None  # fmt: skip

    async def _complete(self, stream: trio.SocketStream, conn: h11.Connection, req: Request,
                        card: ModelCard) -> None:  # fmt: skip
        """Generate and reply: whole, or as server-sent events from the first token on (an error
        before it is an HTTP status, after it an error event)."""
        ids, tokenizer = await self._prompt_ids(req, card)
        reply = _Reply(req, card.model_id)
        text = TextStream(tokenizer.decode, req.stop)
        pieces: list[str] = []
        streaming = False  # the response head is out
        finish = "length"
        try:
            try:
                with trio.fail_after(self.limits.generation_timeout):
                    async with (
                        self.client.session() as session,
                        aclosing(session.generate(ids, req.max_tokens, sampling=req.sampling)) as gen,
                    ):
                        async for token in gen:
                            if token in card.stop:  # the end of the answer, not part of its text
                                finish = "stop"
                                break
                            delta = text.push(token)
                            if not req.stream:
                                pieces.append(delta)
                            elif delta or not streaming:
                                head = (
                                    b""
                                    if streaming
                                    else conn.send(
                                        h11.Response(status_code=200, headers=_headers("text/event-stream"))
                                    )
                                )
                                chunk = _sse(reply.chunk(delta, None, first=not streaming))
                                await stream.send_all(head + conn.send(h11.Data(data=chunk)))
                                streaming = True
                            if text.stopped:
                                finish = "stop"
                                break
            except trio.TooSlowError:
                raise ApiError(504, f"the generation took more than {self.limits.generation_timeout} s",
                               "timeout") from None  # fmt: skip
            except (MeshError, LatticeError) as exc:
                raise _mesh_error(exc) from None
        except ApiError as exc:
            if not streaming:
                raise
            await stream.send_all(conn.send(h11.Data(data=_sse(exc.body()) + b"data: [DONE]\n\n"))
                                  + conn.send(h11.EndOfMessage()))  # fmt: skip
            return
        tail = text.finish()
        if text.stopped:  # a stop string completed only in the held-back end of the text
            finish = "stop"
        usage = _usage(len(ids), len(text.tokens) + (finish == "stop" and not text.stopped))
        self.stats["completed"] += 1
        self.stats["tokens"] += usage["completion_tokens"]
        if not req.stream:
            await _send(stream, _whole(conn, 200, reply.whole("".join(pieces) + tail, finish, usage)))
            return
        out = (
            b""
            if streaming
            else conn.send(h11.Response(status_code=200, headers=_headers("text/event-stream")))
        )
        if not streaming:  # no token at all: the role chunk still comes first
            out += conn.send(h11.Data(data=_sse(reply.chunk("", None, first=True))))
        out += conn.send(h11.Data(data=_sse(reply.chunk(tail, finish))))
        if req.include_usage:
            out += conn.send(h11.Data(data=_sse(reply.usage_chunk(usage))))
        await stream.send_all(
            out + conn.send(h11.Data(data=b"data: [DONE]\n\n")) + conn.send(h11.EndOfMessage())
        )


def _mesh_error(exc: LatticeError) -> ApiError:
    """The HTTP error for a mesh failure: a request over a server's limits is the caller's (400);
    no chain is 503; anything else the mesh did is 502."""
    if isinstance(exc, RemoteError) and exc.type == RequestTooLarge.__name__:
        return ApiError(400, f"a stage server refused: {inert(str(exc))}", param="max_tokens")
    if isinstance(exc, NoChainError):
        return ApiError(503, inert(str(exc)), "service_unavailable")
    return ApiError(502, inert(str(exc)), "mesh_error")


class _Slot:
    """A generation counted against its client while it runs."""

    def __init__(self, active: Counter[str], client: str) -> None:
        self.active, self.client = active, client

    def __enter__(self) -> _Slot:
        self.active[self.client] += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self.active[self.client] -= 1
        if self.active[self.client] <= 0:
            del self.active[self.client]


def _header(request: h11.Request, name: bytes) -> str | None:
    for key, value in request.headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _headers(content_type: str, length: int | None = None) -> list[tuple[str, str]]:
    out = [("Content-Type", content_type), ("Cache-Control", "no-store"), ("Connection", "close"),
           ("X-Content-Type-Options", "nosniff")]  # fmt: skip
    if length is not None:
        out.append(("Content-Length", str(length)))
    return out


def _whole(conn: h11.Connection, status: int, obj: Any) -> bytes:
    """A whole JSON response (one request per connection); written by hand when h11 cannot (the
    request head was refused before it was complete)."""
    body = json.dumps(obj).encode()
    headers = _headers("application/json", len(body))
    try:
        head = h11.Response(status_code=status, reason=HTTPStatus(status).phrase, headers=headers)
        return conn.send(head) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    except h11.LocalProtocolError:
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", *(f"{k}: {v}" for k, v in headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _send(stream: trio.SocketStream, data: bytes) -> None:
    with trio.fail_after(30):
        await stream.send_all(data)
