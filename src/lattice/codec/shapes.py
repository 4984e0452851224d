"""Tensor shapes from the wire, checked before numpy sees them.

numpy refuses a shape whose nonzero dimensions multiply (times the item size) past its index range,
even when another dimension is 0 and the array holds no bytes: ``[2**31, 2**31, 0]`` of float32
passes a plain ``prod(shape) == nbytes`` check and then raises ValueError in ``reshape``. Checking
the product of the nonzero dimensions against the message's byte limit keeps every shape that
passes here usable, and bounds every integer computed from it.
"""

from __future__ import annotations

from typing import Any

from lattice.errors import PayloadError

__all__ = ["MAX_ARRAY_BYTES", "MAX_DIMS", "checked_nbytes"]

MAX_DIMS = 32
MAX_ARRAY_BYTES = 1 << 48  # far above any message limit, far below numpy's index range (2**63)


def checked_nbytes(shape: Any, itemsize: int, limit: int) -> int:
    """Bytes of a tensor of ``shape`` (a list from the wire) with ``itemsize``-byte elements, or
    PayloadError: at most MAX_DIMS non-negative integer dimensions, and the nonzero ones times
    ``itemsize`` within ``limit`` bytes (and MAX_ARRAY_BYTES)."""
    if not isinstance(shape, list | tuple) or len(shape) > MAX_DIMS:
        raise PayloadError(f"tensor shape must be a list of at most {MAX_DIMS} dimensions")
    limit = min(limit, MAX_ARRAY_BYTES)
    span = itemsize
    empty = False
    for d in shape:
        if type(d) is not int or d < 0:
            raise PayloadError("tensor dimensions must be non-negative integers")
        if d:
            span *= d
            if span > limit:  # checked per dimension: the product never grows past limit * 2**64
                raise PayloadError(f"tensor shape {list(shape)} is over the limit of {limit} bytes")
        else:
            empty = True
    return 0 if empty else span
