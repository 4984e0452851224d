"""Errors of mesh inference; servers raise them by name, so callers can tell them apart remotely."""

from __future__ import annotations

from lattice.errors import LatticeError


class MeshError(LatticeError):
    """Base class of mesh inference errors."""


class NoChainError(MeshError):
    """No chain of live stage servers covers every block; ``missing`` names the uncovered ranges."""

    def __init__(
        self, model_id: str, missing: list[tuple[int, int]], detail: str = "", cause: str = ""
    ) -> None:
        if missing:
            ranges = ", ".join(f"{a}:{b}" for a, b in missing)
            text = f"no chain of stage servers for {model_id}: nobody serves blocks {ranges}{detail}"
        else:
            text = f"no stage server announces {model_id}{detail}"
        super().__init__(f"{cause}, and {text}" if cause else text)  # cause: what made us look again
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


def real_cause(exc: BaseException) -> BaseException:
    """The error to report for ``exc``: inside (nested) exception groups, the first LatticeError,
    else the first error that is not a cancellation; ``exc`` itself otherwise."""
    leaves = list(_leaves(exc))
    for leaf in leaves:
        if isinstance(leaf, LatticeError):
            return leaf
    import trio  # here: this module is imported by lattice-node's command listing

    return next((leaf for leaf in leaves if not isinstance(leaf, trio.Cancelled)), exc)


def _leaves(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc
