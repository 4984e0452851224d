"""Third-party modules imported on first use, so a daemon becomes ready without paying for them.

numpy costs 0.1-0.2 s and ~10 MiB at import and pycrdt ~0.05 s; a node needs neither until a
tensor, a content chunk or a CRDT document arrives. Modules that hold them write::

    if TYPE_CHECKING:
        import numpy as np
    else:
        np = lazy_module("numpy")

and use ``np.ndarray`` etc. as before. For third-party modules only: lattice's own lazy imports
stay ``import`` statements inside functions, so the layer check (tests/test_layers.py) sees them.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = ["lazy_module"]


class _LazyModule(ModuleType):
    """Stands for a module until an attribute is read: then imports it and keeps each attribute it
    hands out, so later reads are plain attribute reads (no import machinery on hot paths)."""

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self.__name__), attr)
        setattr(self, attr, value)
        return value


def lazy_module(name: str) -> Any:
    """A stand-in for module ``name`` that imports it when one of its attributes is first read."""
    return _LazyModule(name)
