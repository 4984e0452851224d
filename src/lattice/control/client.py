"""``lattice.Client``: drive a running ``lattice-node`` daemon from another process.

Blocking and dependency-light (plain sockets + msgpack, no trio), so any script can use it::

    from lattice import Client
    with Client("/path/to/control.sock") as c:
        print(c.id()["peer_id"], c.peers())
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lattice.control import protocol
from lattice.errors import ControlError, RemoteError

__all__ = ["Client", "ControlRemoteError", "RemoteError"]


class ControlRemoteError(RemoteError, ControlError):
    """The daemon ran the operation and it failed; ``type`` names the daemon-side error (an RPC
    call's remote error keeps the type the peer reported)."""


class Client:
    def __init__(self, socket_path: str | os.PathLike[str] | None = None, timeout: float = 60.0) -> None:
        if socket_path is None:
            from lattice.config import NodeConfig

            socket_path = NodeConfig.load().control_path
        self.path = Path(socket_path)  # type: ignore[arg-type]
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._buf = bytearray()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            self._sock.close()
            raise ControlError(
                f"no daemon is listening on control socket {self.path} (is `lattice-node run` running?)"
            ) from None
        except OSError as exc:
            self._sock.close()
            raise ControlError(f"cannot connect to control socket {self.path}: {exc.strerror}") from None

    # -- generic calls
    def call(self, op: str, **args: Any) -> Any:
        """Run ``op`` on the daemon and return its result (RemoteError if it failed)."""
        items = list(self._request(op, args))
        return items[-1][1]

    def stream(self, op: str, **args: Any) -> Iterator[Any]:
        """Items of a streaming operation as they arrive."""
        for kind, value in self._request(op, args):
            if kind == "item":
                yield value

    def _request(self, op: str, args: dict) -> Iterator[tuple[str, Any]]:
        req_id = next(self._ids)
        try:
            for part in protocol.encode_parts({"id": req_id, "op": op, "args": args}):
                self._sock.sendall(part)
            while True:
                reply = self._read()
                if reply.get("id") != req_id:
                    continue
                if "item" in reply:
                    yield "item", reply["item"]
                    continue
                if reply.get("ok"):
                    yield "result", reply.get("result")
                    return
                error = reply.get("error") or {}
                kind, text = str(error.get("type", "Error")), str(error.get("message", "unknown error"))
                raise ControlRemoteError(kind, text)
        except TimeoutError:
            raise ControlError(f"daemon did not answer {op!r} within {self.timeout:.0f}s") from None
        except (BrokenPipeError, ConnectionResetError):
            raise ControlError("the daemon closed the control connection") from None

    def _read(self) -> dict:
        while len(self._buf) < 8:
            self._fill()
        length = protocol.frame_length(bytes(self._buf[:8]))
        while len(self._buf) < 8 + length:
            self._fill()
        message = protocol.decode(memoryview(self._buf)[8 : 8 + length])
        del self._buf[: 8 + length]
        return message

    def _fill(self) -> None:
        chunk = self._sock.recv(4 << 20)
        if not chunk:
            raise ControlError("the daemon closed the control connection")
        self._buf += chunk

    # -- the node's operations (same names as Node's methods)
    def id(self) -> dict:
        return self.call("id")

    def peers(self) -> list[dict]:
        return self.call("peers")

    def status(self) -> dict:
        return self.call("status")

    def connect(self, addr: str, timeout: float | None = None) -> str:
        return self.call("connect", addr=str(addr), timeout=timeout)

    def ping(self, target: str, count: int = 1, timeout: float | None = None) -> list[float]:
        return self.call("ping", target=str(target), count=count, timeout=timeout)

    def disconnect(self, peer: str) -> None:
        self.call("disconnect", peer=str(peer))

    @property
    def dht(self) -> _ClientDHT:
        """The daemon's DHT: ``client.dht.put(key, value)``, ``get``, ``provide``, ``providers``."""
        return _ClientDHT(self)

    @property
    def content(self) -> _ClientContent:
        """The daemon's content store: ``client.content.add(path)``, ``get(cid, output)``, ``pins()``."""
        return _ClientContent(self)

    @property
    def rpc(self) -> _ClientRPC:
        """RPC through the daemon: ``client.rpc.call(peer, "svc.method", payload)`` (tensors allowed)."""
        return _ClientRPC(self)

    def shutdown(self) -> None:
        """Ask the daemon to stop (it answers first, then shuts down)."""
        self.call("shutdown")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ClientRPC:
    def __init__(self, client: Client) -> None:
        self._client = client

    def call(
        self,
        peer: str,
        method: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        codec: str | None = None,
    ) -> Any:
        return self._client.call(
            "rpc.call", peer=str(peer), method=method, payload=payload, timeout=timeout, codec=codec
        )

    def methods(self) -> list[str]:
        return self._client.call("rpc.methods")

    def bench(
        self, peer: str, size: int, count: int = 5, direction: str = "up", concurrency: int = 1
    ) -> dict:
        return self._client.call(
            "rpc.bench", peer=str(peer), size=size, count=count, direction=direction, concurrency=concurrency
        )


class _ClientDHT:
    def __init__(self, client: Client) -> None:
        self._client = client

    def put(self, key: str, value: bytes | str, ttl: float = 3600.0, subkey: str | None = None) -> int:
        return self._client.call("dht.put", key=key, value=value, ttl=ttl, subkey=subkey)

    def get(self, key: str, latest: bool = True, local: bool = False) -> list[dict]:
        return self._client.call("dht.get", key=key, latest=latest, local=local)

    def provide(self, key: str) -> int:
        return self._client.call("dht.provide", key=key)

    def providers(self, key: str, count: int = 20) -> list:
        return self._client.call("dht.providers", key=key, count=count)

    def status(self) -> dict:
        return self._client.call("dht.status")


class _ClientContent:
    """Paths are the daemon's: give absolute ones (the daemon's working directory is not yours)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def add(self, path: str | os.PathLike[str], pin: bool = True, chunk_size: int | None = None) -> dict:
        """{"cid", "size"} of a file added (read by the daemon)."""
        return self._client.call("content.add", path=os.path.abspath(path), pin=pin, chunk_size=chunk_size)

    def get(
        self,
        cid: str,
        output: str | os.PathLike[str] | None = None,
        providers: list[str] | None = None,
        pin: bool = True,
        discover: bool = True,
    ) -> Iterator[dict]:
        """Progress dicts as the fetch goes, then {"done": True, "path", ...}. Closing the connection
        (or the process) cancels the fetch; the next ``get`` resumes it. ``discover=False``: only
        the ``providers`` given, none found in the DHT."""
        out = os.path.abspath(output) if output is not None else None
        yield from self._client.stream(
            "content.get", cid=str(cid), output=out, providers=providers, pin=pin, discover=discover
        )

    def pins(self) -> list[dict]:
        return self._client.call("content.pins")

    def pin(self, cid: str) -> None:
        self._client.call("content.pin", cid=str(cid))

    def unpin(self, cid: str) -> bool:
        return self._client.call("content.unpin", cid=str(cid))

    def gc(self) -> dict:
        return self._client.call("content.gc")

    def verify(self, cid: str) -> dict:
        return self._client.call("content.verify", cid=str(cid))

    def status(self) -> dict:
        return self._client.call("content.status")
