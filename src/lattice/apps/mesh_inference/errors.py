"""Errors of mesh inference; servers raise them by name, so callers can tell them apart remotely."""

from __future__ import annotations

from lattice.errors import LatticeError


class MeshError(LatticeError):
    """Base class of mesh inference errors."""


class NoChainError(MeshError):
    """No chain of live stage servers covers every block; ``missing`` names the uncovered ranges."""

    def __init__(self, model_id: str, missing: list[tuple[int, int]], detail: str = "") -> None:
        if missing:
            ranges = ", ".join(f"{a}:{b}" for a, b in missing)
            text = f"no chain of stage servers for {model_id}: nobody serves blocks {ranges}{detail}"
        else:
            text = f"no stage server announces {model_id}{detail}"
        super().__init__(text)
        self.model_id = model_id
        self.missing = missing


class ServerBusy(MeshError):
    """The server has as many sessions as it accepts."""


class CacheFull(MeshError):
    """The server's KV-cache memory budget would be exceeded."""


class RequestTooLarge(MeshError):
    """A call over a per-session or per-call limit (context length, reply size), refused before any
    compute; not re-routed: a session that long is refused by servers with the default limits."""


class SessionError(MeshError):
    """Unknown or expired session, or a position that does not match the server's cache."""


# Remote error types after which the client routes around the server (it is fine, just not for us)
REROUTE_ERRORS = ("ServerBusy", "CacheFull", "SessionError")
