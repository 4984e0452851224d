"""The CRDT state store (local layer): signed updates, the durable log, replicated documents."""

from .document import MAX_DOC_BYTES, Change, DocLimits, DocStats, Document, log_path
from .errors import AccessDenied, DocumentFull, StaleHandle
from .log import UpdateLog
from .updates import MAX_DOC_NAME, MAX_UPDATE, SignedUpdate, sign

__all__ = [
    "MAX_DOC_BYTES",
    "MAX_DOC_NAME",
    "MAX_UPDATE",
    "AccessDenied",
    "Change",
    "DocLimits",
    "DocStats",
    "Document",
    "DocumentFull",
    "SignedUpdate",
    "StaleHandle",
    "UpdateLog",
    "log_path",
    "sign",
]
