"""The daemon's local control API: a Unix socket (mode 0600) serving registered operations.

Operations are plain async functions taking keyword arguments and returning msgpack-able values (or
async generators, whose items are streamed). Services register their own operations, so later layers
(DHT, CRDT, RPC) extend the API without touching this module.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import socket as stdsocket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from lattice._files import private_dir
from lattice.control import protocol
from lattice.errors import ConfigError, ControlError, LatticeError, PayloadError, RemoteError

log = logging.getLogger(__name__)

Operation = Callable[..., Any]
MAX_CLIENTS = 64


class ControlServer:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.ops: dict[str, Operation] = {}
        self._listener: trio.SocketListener | None = None
        self._clients = 0

    def register(self, name: str, op: Operation) -> None:
        if name in self.ops:
            raise ValueError(f"control operation {name!r} is already registered")
        self.ops[name] = op

    async def bind(self) -> None:
        """Create the socket in a directory only we can write, replacing only a stale socket: never a
        live daemon's socket, nor a file or symlink that happens to have that name."""
        path = self.path
        private_dir(path.parent, "control socket directory")
        _remove_stale_socket(path)
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            await sock.bind(str(path))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot create control socket {path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(16)
        self._listener = trio.SocketListener(sock)

    async def serve(self) -> None:
        assert self._listener is not None, "bind() first"
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    stream = await self._listener.accept()
                    if self._clients >= MAX_CLIENTS:
                        await trio.aclose_forcefully(stream)
                        continue
                    self._clients += 1
                    nursery.start_soon(self._serve_client, stream)
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._listener)
                try:
                    self.path.unlink()
                except OSError:
                    pass

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        buf = bytearray()
        try:
            async with stream, trio.open_nursery() as nursery:
                send_lock = trio.Lock()
                while True:
                    message = await _read_frame(stream, buf)
                    if message is None:  # the client went away: nobody waits for what it asked
                        nursery.cancel_scope.cancel()  # (a killed `lattice-node get` stops its fetch)
                        return
                    nursery.start_soon(self._dispatch, stream, send_lock, message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except protocol.FrameError as exc:
            log.info("control client sent a bad frame: %s", exc)
        except PayloadError as exc:
            log.info("control reply could not be encoded: %s", exc)
        except Exception:  # a bug handling one client must not take the daemon down
            log.exception("control client handler failed")
        finally:
            self._clients -= 1

    async def _dispatch(self, stream, send_lock: trio.Lock, message: dict) -> None:
        req_id = message.get("id")
        op_name = message.get("op")
        args = message.get("args") or {}

        async def send(reply: dict) -> None:
            async with send_lock:
                try:
                    for part in protocol.encode_parts({"id": req_id, **reply}):
                        await stream.send_all(part)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

        op = self.ops.get(op_name) if isinstance(op_name, str) else None
        if op is None:
            await send(
                {"ok": False, "error": {"type": "ControlError", "message": f"unknown operation {op_name!r}"}}
            )
            return
        if not isinstance(args, dict):
            await send({"ok": False, "error": {"type": "ControlError", "message": "args must be a map"}})
            return
        try:
            result = op(**args)
            if inspect.isasyncgen(result):
                async for item in result:
                    await send({"item": item})
                result = None
            elif inspect.isawaitable(result):
                result = await result
            await send({"ok": True, "result": result})
        except TypeError as exc:
            await send(
                {
                    "ok": False,
                    "error": {"type": "ControlError", "message": f"bad arguments for {op_name}: {exc}"},
                }
            )
        except LatticeError as exc:
            await send({"ok": False, "error": _error(exc)})
        except trio.TooSlowError:
            await send({"ok": False, "error": {"type": "TimeoutError", "message": f"{op_name} timed out"}})
        except Exception as exc:
            log.exception("control operation %s failed", op_name)
            await send(
                {"ok": False, "error": {"type": "InternalError", "message": f"{type(exc).__name__}: {exc}"}}
            )


def _error(exc: LatticeError) -> dict:
    """A failed operation as the client sees it: its class and message; an error a peer reported
    (an RPC handler's, RemoteError) as the peer reported it."""
    if isinstance(exc, RemoteError):
        return {"type": exc.type, "message": exc.remote_message}
    return {"type": type(exc).__name__, "message": str(exc)}


async def _read_frame(stream: trio.SocketStream, buf: bytearray) -> dict | None:
    while len(buf) < 8:
        chunk = await stream.receive_some(65536)
        if not chunk:
            if buf:
                raise protocol.FrameError("control connection closed inside a frame")
            return None
        buf += chunk
    length = protocol.frame_length(bytes(buf[:8]))
    while len(buf) < 8 + length:
        chunk = await stream.receive_some(1 << 20)
        if not chunk:
            raise protocol.FrameError("control connection closed inside a frame")
        buf += chunk
    message = protocol.decode(memoryview(buf)[8 : 8 + length])
    del buf[: 8 + length]
    return message


def _remove_stale_socket(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"cannot check control socket {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"control socket path {path} exists and is not a socket; refusing to replace it")
    if _socket_is_live(path):
        raise ConfigError(f"control socket {path} is in use by another running daemon")
    path.unlink()


def _socket_is_live(path: Path) -> bool:
    probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            return False
        raise ControlError(f"cannot check control socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    return True
