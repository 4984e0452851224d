"""Content-addressed blobs and checkpoints: added locally, announced in the DHT, fetched from many
peers at once and verified chunk by chunk (issue 20)."""

from lattice.content.cid import ContentId
from lattice.content.config import ContentConfig, FetchLimits
from lattice.content.errors import ContentBusy, ContentError, ContentNotFound, IntegrityError, StoreFull
from lattice.content.manifest import Manifest, TensorEntry
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
