"""The daemon's malloc settings (lattice._allocator): freed heap memory is kept for reuse."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from lattice._allocator import keep_freed_memory

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

if sys.argv[1] == "on":
    assert keep_freed_memory()
blocks = [bytearray(2 << 20) for _ in range(8)]  # 16 MiB in 2 MiB blocks, touched (zeroed)
before = rss_kib()
del blocks
print(before - rss_kib())  # KiB given back to the kernel when they were freed
"""


def given_back_kib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_stay_in_the_process_for_the_next_allocations():
    assert given_back_kib("off") >= 12 << 10  # glibc's default: 2 MiB blocks are mapped and unmapped
    assert given_back_kib("on") < 4 << 10  # kept on the heap (under the 32 MiB trim threshold)
