"""The content service's limits: ``ContentConfig`` (a ``[node.content]`` table in the config file;
docs/operators.md, "Content store and transfers")."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from lattice.content.manifest import MAX_CHUNK, MIN_CHUNK
from lattice.errors import ConfigError

__all__ = ["ContentConfig", "FetchLimits"]


DEFAULT_MAX_BYTES = 32 << 30  # the store's quota when nothing else is said


@dataclass
class FetchLimits:
    """How a fetch uses its providers (``fetch_*`` keys of ``[node.content]``)."""

    requests_per_provider: int = 2  # requests in flight to one provider (up to twice this near their ends)
    # a worker asks for its next batch while this many chunks of its current one are still to come
    # (0: once it ended); a provider refusing that second request (its per-peer limit) gets one at a time
    request_ahead: int = 2
    max_requests: int = 16  # ... and to all of them (receiver memory: about this many chunks + windows)
    max_batch: int = 16  # chunks one request asks for, at most (fewer from slow providers)
    # chunks received and waiting to be verified and written, and at most as many MiB (receiver
    # memory: chunks larger than 1 MiB get fewer slots). 32, not 8: with 8 a
    # hiccup of the two disk workers filled it, stopped the reader and made batches small (twice the
    # thread hops); 32 took a 1 GiB get from 512 to 594 MiB/s and -15 % fetcher CPU (bench/content_cpu.py)
    write_queue: int = 32
    write_batch: int = 4  # a request's chunks go to a worker thread (one hop for all) once this many wait
    write_linger: float = 0.05  # a batch not full is written this long after its first chunk came
    # with at most this many CPUs to run on, chunks are hashed on the event loop and only written by
    # a worker thread: handing the GIL to a hashing thread and back, core to core, cost more than
    # hashing in parallel gained (2 cores: +8-11 % MiB/s, bench/content_cpu.py); 0: always in threads
    hash_on_loop_cpus: int = 2
    max_providers: int = 8  # providers used at once
    request_timeout: float = 30.0  # one request (a batch of chunks); then its chunks go elsewhere
    endgame_copies: int = 2  # copies of a chunk raced at the end
    endgame_batch: int = 2  # chunks an idle provider races at a time (those due last elsewhere)
    max_failures: int = 3  # failed requests in a row before a provider is dropped
    discover_interval: float = 5.0  # the DHT is asked for more providers this often
    stall_timeout: float = 30.0  # no provider able to help for this long: the fetch fails

    def __post_init__(self) -> None:
        for name in (
            "requests_per_provider",
            "max_requests",
            "max_batch",
            "write_queue",
            "write_batch",
            "max_providers",
            "endgame_batch",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"content.fetch_{name} must be at least 1")


@dataclass
class ContentConfig:
    """Limits of the content service."""

    chunk_size: int = 1 << 20  # new content is cut into chunks of this size (4 KiB - 4 MiB)
    max_bytes: int | None = None  # store quota; None: DEFAULT_MAX_BYTES (NodeConfig.content_max_bytes)
    max_manifest: int = 16 << 20  # largest manifest accepted (~230,000 chunks)
    max_metadata: int = 32 << 20  # largest safetensors header Content.metadata fetches (a tokenizer fits)
    verify_on_open: bool = False  # re-hash every stored chunk at start (sizes are always checked)
    direct_writes: bool = True  # fetched chunks bypass the page cache (O_DIRECT) where the FS allows
    announce_interval: float = 3600.0  # pinned content is re-announced in the DHT this often
    # serving: what one peer, and all of them, may make this node do
    serve_max_requests: int = 64  # chunk requests served at once, all peers
    serve_peer_requests: int = 4  # ... from one peer
    serve_min_per_peer: int = 1  # ... that a peer gets even when the node is at its total
    serve_peer_rate: float = 0.0  # bytes per second one peer is served (0: no cap)
    max_request_chunks: int = 16  # chunks one request may ask for
    bad_provider_ttl: float = 3600.0  # a provider that sent a bad chunk is not used again for this long
    fetch: FetchLimits = field(default_factory=FetchLimits)

    def __post_init__(self) -> None:
        if not MIN_CHUNK <= self.chunk_size <= MAX_CHUNK:
            raise ConfigError(f"content.chunk_size must be in [{MIN_CHUNK}, {MAX_CHUNK}]")

    @classmethod
    def from_table(cls, table: dict[str, Any], max_bytes: int | None = None) -> ContentConfig:
        """From a ``[node.content]`` table (``fetch_<name>`` keys set FetchLimits); ConfigError names
        an unknown key or a bad value."""
        if not isinstance(table, dict):
            raise ConfigError("content must be a table of content limits")
        own = {f.name: f for f in fields(cls) if f.name not in ("fetch", "max_bytes")}
        fetch = {f"fetch_{f.name}": f for f in fields(FetchLimits)}
        values: dict[str, Any] = {}
        fetch_values: dict[str, Any] = {}
        for key, value in table.items():
            f = own.get(key) or fetch.get(key)
            if f is None:
                known = ", ".join(sorted([*own, *fetch]))
                raise ConfigError(f"unknown content key {key!r} (known: {known})")
            default = f.default
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            else:
                ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
                ok = ok and (isinstance(value, int) or not isinstance(default, int))
            if not ok:
                raise ConfigError(f"content.{key} must be {_kind(default)}")
            if key in fetch:
                fetch_values[key.removeprefix("fetch_")] = value
            else:
                values[key] = value
        return cls(**values, max_bytes=max_bytes, fetch=FetchLimits(**fetch_values))


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "true or false"
    return "a non-negative integer" if isinstance(default, int) else "a non-negative number"
