"""Content-addressed blobs and checkpoints: added locally, announced in the DHT, fetched from many
peers at once and verified chunk by chunk (issue 20)."""

from typing import TYPE_CHECKING, Any

from lattice.content.cid import ContentId
from lattice.content.config import ContentConfig, FetchLimits
from lattice.content.errors import ContentBusy, ContentError, ContentNotFound, IntegrityError, StoreFull
from lattice.content.manifest import Manifest, TensorEntry

if TYPE_CHECKING:
    from lattice.content.service import Content

__all__ = [
    "Content",
    "ContentBusy",
    "ContentConfig",
    "ContentError",
    "ContentId",
    "ContentNotFound",
    "FetchLimits",
    "IntegrityError",
    "Manifest",
    "StoreFull",
    "TensorEntry",
]


def __getattr__(name: str) -> Any:
    """``Content``, loaded on first use: lattice.config imports this package for its limits, and the
    service's modules pull numpy and the RPC in."""
    if name != "Content":
        raise AttributeError(f"module 'lattice.content' has no attribute {name!r}")
    from lattice.content.service import Content

    return Content
