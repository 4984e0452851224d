"""Errors of the CRDT state store."""

from __future__ import annotations

from lattice.errors import LatticeError, PayloadError


class AccessDenied(LatticeError):
    """The author (local node or remote peer) is not on the document's writer list."""


class StaleHandle(LatticeError):
    """A shared-type handle from before a rejected local write was used; call ``get_map`` etc. again."""


class DocumentFull(PayloadError):
    """A local write would take the document over its size limit (``max_bytes``); nothing changed."""
