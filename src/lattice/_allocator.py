"""The daemon's malloc settings: keep freed heap memory instead of giving it back at once.

Why: glibc gives the top of the heap back to the kernel as soon as more than its trim threshold is
free, and its dynamic thresholds put ~1 MiB buffers on that heap; a bulk transfer allocates and frees
such buffers (frames not decrypted in place, message headers, numpy views) many times per second, so
the heap shrank and grew ~2 times per MiB moved, and every page grown again was faulted in and
zeroed by the kernel. Measured on a 1 GiB `content.get` (bench/content_cpu.py, alternated): 0 `brk`
calls instead of ~1.9 per MiB, 3-15 % less CPU per MiB over both daemons. The cost: up to
``TRIM`` of free heap stays in the process (RSS), and blocks under ``MMAP`` come from the heap.

Only ``lattice-node run`` calls this: an application embedding a node keeps its own settings.
"""

from __future__ import annotations

import ctypes

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP = 4 << 20  # blocks this large or larger are mapped on their own (and unmapped when freed)
TRIM = 32 << 20  # free memory at the top of the heap kept for the next allocations


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds (fixed values also stop their dynamic adjustment);
    False where the C library has no ``mallopt`` (musl, macOS, Windows): nothing changes."""
    try:  # the process's own symbols, libc's among them (find_library would spawn ldconfig)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM))
