"""One parsed GGUF file per path, shared by the weights loader and the tokenizer."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from lattice.errors import ConfigError

__all__ = ["gguf_reader"]


@functools.lru_cache(maxsize=4)
def gguf_reader(path: Path) -> Any:
    """One parsed (memory-mapped) reader per file: parsing SmolLM2's metadata takes seconds."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigError("GGUF models need `pip install gguf` (the lattice-p2p[mesh] extra)") from None
    return GGUFReader(str(path), "r")
