"""What stage servers announce, how a client picks a chain of them, how blocks are split.

Pure functions over announcements, so chain choice and splitting are tested without a network.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import msgpack

from lattice.apps.mesh_inference.errors import NoChainError

MAX_BLOCKS = 4096
MAX_ADDRS = 8
MAX_ADDR_LEN = 512


def announcement_key(model_id: str) -> str:
    return f"mesh/{model_id}"


@dataclass(frozen=True)
class ServerInfo:
    """One stage server as announced in the DHT (one subkey per server under ``mesh/<model>``)."""

    peer: str
    start: int
    end: int
    n_layers: int
    throughput: float  # tokens/s through its blocks (one-token steps, measured at start)
    free_memory: int  # bytes the machine has available
    cache_free: int  # bytes left in its KV-cache budget
    sessions: int
    max_sessions: int
    addrs: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return msgpack.packb(
            {"v": 1, "start": self.start, "end": self.end, "n_layers": self.n_layers,
             "throughput": self.throughput, "free_memory": self.free_memory, "cache_free": self.cache_free,
             "sessions": self.sessions, "max_sessions": self.max_sessions, "addrs": list(self.addrs)},
        )  # fmt: skip

    @classmethod
    def decode(cls, peer: str, data: bytes) -> ServerInfo | None:
        """The announcement, or None if it is malformed (never trusted beyond these checks)."""
        try:
            d = msgpack.unpackb(data, raw=False, max_str_len=MAX_ADDR_LEN, max_array_len=MAX_ADDRS,
                                max_map_len=16)  # fmt: skip
            ints = [d[k] for k in ("start", "end", "n_layers", "free_memory", "cache_free", "sessions",
                                   "max_sessions")]  # fmt: skip
            addrs = d.get("addrs", [])
            if not all(type(x) is int and x >= 0 for x in ints) or not isinstance(addrs, list):
                return None
            if not all(isinstance(a, str) and a.startswith("/") for a in addrs):
                return None
            throughput = float(d["throughput"])
            start, end, n_layers = ints[:3]
            if not 0 <= start < end <= n_layers <= MAX_BLOCKS or not throughput >= 0:
                return None
            free_memory, cache_free, sessions, max_sessions = ints[3:]
            return cls(peer, start, end, n_layers, throughput, free_memory, cache_free, sessions,
                       max_sessions, tuple(addrs))  # fmt: skip
        except Exception:
            return None

    @property
    def full(self) -> bool:
        return self.sessions >= self.max_sessions


@dataclass
class Hop:
    """One step of a chain: ``server`` runs blocks [start, end) (a sub-range of what it holds)."""

    server: ServerInfo
    start: int
    end: int

    def __repr__(self) -> str:
        return f"Hop({self.server.peer[-6:]} {self.start}:{self.end})"


def uncovered(servers: Iterable[ServerInfo], start: int, end: int) -> list[tuple[int, int]]:
    """Block ranges in [start, end) that no server holds."""
    covered = [False] * (end - start)
    for s in servers:
        for b in range(max(s.start, start), min(s.end, end)):
            covered[b - start] = True
    gaps, gap_start = [], None
    for i, ok in enumerate([*covered, True]):
        if not ok and gap_start is None:
            gap_start = i
        elif ok and gap_start is not None:
            gaps.append((start + gap_start, start + i))
            gap_start = None
    return gaps


def find_chain(
    servers: Iterable[ServerInfo], start: int, end: int, model_id: str = "?", exclude: Iterable[str] = ()
) -> list[Hop]:
    """The chain covering [start, end) with the fewest hops, then the highest bottleneck throughput,
    then the fewest sessions; servers in ``exclude`` (dead or refusing) and full ones are skipped."""
    excluded = set(exclude)
    live = [s for s in servers if s.peer not in excluded and not s.full]
    best: dict[int, tuple[tuple[int, float, int], list[Hop]] | None] = {end: ((0, -float("inf"), 0), [])}
    for p in range(end - 1, start - 1, -1):
        choice = None
        for s in live:
            if not s.start <= p < s.end:
                continue
            nxt = min(s.end, end)
            tail = best.get(nxt)
            if tail is None:
                continue
            (hops, neg_thr, load), rest = tail
            score = (hops + 1, max(neg_thr, -s.throughput), load + s.sessions)
            if choice is None or score < choice[0]:
                choice = (score, [Hop(s, p, nxt), *rest])
        best[p] = choice
    found = best[start]
    if found is None:
        gaps = uncovered(live, start, end)
        detail = f" ({len(excluded)} excluded)" if excluded else ""
        raise NoChainError(model_id, gaps or [(start, end)], detail)
    return found[1]


def plan_split(n_layers: int, peers: list[tuple[int, float]], block_bytes: int) -> list[tuple[int, int]]:
    """Contiguous block ranges for ``peers`` given as (free memory bytes, speed), in order.

    Each peer gets blocks in proportion to its speed, capped by what fits in its memory; what a
    capped peer cannot take goes to the others. Raises ValueError if the blocks do not fit at all.
    """
    if not peers:
        raise ValueError("no peers to split over")
    caps = [max(0, mem // max(block_bytes, 1)) for mem, _ in peers]
    if sum(caps) < n_layers:
        raise ValueError(f"{n_layers} blocks of {block_bytes} bytes do not fit in the peers' memory")
    counts = [0] * len(peers)
    left = n_layers
    while left > 0:  # water-filling: share what is left by speed among peers with room
        open_ = [i for i in range(len(peers)) if counts[i] < caps[i]]
        total = sum(max(peers[i][1], 1e-9) for i in open_)
        shares = {i: max(peers[i][1], 1e-9) / total * left for i in open_}
        given = 0
        for i in open_:
            add = min(int(shares[i]), caps[i] - counts[i])
            counts[i] += add
            given += add
        if given == 0:  # rounding left a remainder: give it to the fastest peers with room
            for i in sorted(open_, key=lambda i: -peers[i][1]):
                if left - given > 0 and counts[i] < caps[i]:
                    counts[i] += 1
                    given += 1
        left -= given
    ranges, pos = [], 0
    for c in counts:
        ranges.append((pos, pos + c))
        pos += c
    return ranges


def choose_blocks(servers: Iterable[ServerInfo], n_layers: int, n_blocks: int) -> tuple[int, int]:
    """The window of ``n_blocks`` contiguous blocks served least (by throughput): where a new server
    helps most. Ties go to the lowest start."""
    n_blocks = max(1, min(n_blocks, n_layers))
    load = [0.0] * n_layers
    for s in servers:
        for b in range(s.start, min(s.end, n_layers)):
            load[b] += max(s.throughput, 1e-3)
    best = min(range(n_layers - n_blocks + 1), key=lambda a: (sum(load[a : a + n_blocks]), a))
    return best, best + n_blocks
