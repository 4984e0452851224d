"""Errors of the content service (lattice.content)."""

from __future__ import annotations

from lattice.errors import LatticeError, PayloadError

__all__ = ["ContentBusy", "ContentError", "ContentNotFound", "IntegrityError", "PayloadError", "StoreFull"]


class ContentError(LatticeError):
    """A content operation failed (bad id, no provider, ...)."""


class ContentNotFound(ContentError):
    """Nobody we asked (or this node's store) holds the content or chunk."""


class IntegrityError(ContentError):
    """Bytes do not match the hash they were named by (a corrupt chunk, manifest or stored file)."""


class StoreFull(ContentError):
    """The content store's quota (``content_max_bytes``) has no room, even after dropping unpinned content."""


class ContentBusy(ContentError):
    """A provider refused a request over its limits (concurrent requests, memory): ask later or elsewhere."""
