"""Helpers shared by the anchor start-up scripts (stdlib only: imported from each anchor's own venv).

The scripts import this module from their own directory (it is on sys.path when a script is run
by path). Nothing here talks to any address but 127.0.0.1, or the script's own ``--host`` address
when a bench runs it inside a WAN testbed host (bench/anchors/in_testbed.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def seconds_since_process_start() -> float:
    """Wall seconds since this process was created (from /proc; 1/CLK_TCK = 10 ms resolution)."""
    with open("/proc/self/stat") as fh:
        start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as fh:
        uptime = float(fh.read().split()[0])
    return max(0.0, uptime - start_ticks / CLK_TCK)


def descendants(pid: int) -> list[int]:
    """All live descendants of pid (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, stack = [], list(children.get(pid, []))
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, []))
    return out


def tree_memory_mib(pid: int | None = None) -> tuple[float, float, int]:
    """(RSS sum, PSS sum, process count) of pid and its descendants, in MiB.

    RSS sums count pages shared between a forked parent and child twice; PSS splits them.
    """
    pid = os.getpid() if pid is None else pid
    rss_pages, pss_kib, count = 0, 0, 0
    for p in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{p}/statm") as fh:
                rss_pages += int(fh.read().split()[1])
            count += 1
        except OSError:
            continue
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        pss_kib += int(line.split()[1])
                        break
        except OSError:
            pass
    return rss_pages * PAGE / 2**20, pss_kib / 1024, count


def tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by pid and its descendants, every thread (from /proc/*/task/*/schedstat,
    nanoseconds): what start-up costs whatever else the machine runs, unlike wall time."""
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{p}/task/{task}/schedstat") as fh:
                    total += int(fh.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (for systems that cannot report theirs)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _read_ms_message(sock: socket.socket) -> bytes:
    """Read one multistream-select message: uvarint length, then that many bytes."""
    length, shift = 0, 0
    while True:
        b = sock.recv(1)
        if not b:
            raise ConnectionError("closed during multistream length")
        length |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            break
        shift += 7
    data = b""
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        if not chunk:
            raise ConnectionError("closed during multistream message")
        data += chunk
    return data


def probe_libp2p(port: int, timeout: float = 2.0, host: str = "127.0.0.1") -> str:
    """Prove the libp2p listener on host:port is served by a live event loop, not just bound.

    Opens a TCP connection, runs multistream-select and proposes /noise; returns the peer's answer
    to the proposal ("/noise" or "na" - either shows the swarm is negotiating). Raises OSError if not.
    """
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(b"\x13/multistream/1.0.0\n")
        if _read_ms_message(s) != b"/multistream/1.0.0\n":
            raise ConnectionError("not a multistream-select listener")
        s.sendall(b"\x07/noise\n")
        return _read_ms_message(s).decode(errors="replace").strip()


def wait_probe(port: int, deadline_s: float = 30.0, host: str = "127.0.0.1") -> str:
    end = time.monotonic() + deadline_s
    while True:
        try:
            return probe_libp2p(port, host=host)
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.002)


def signal_ready() -> None:
    """Tell the driver, through the pipe fd it passed in ANCHOR_READY_FD, that the node is ready."""
    fd = os.environ.get("ANCHOR_READY_FD")
    if fd:
        try:
            os.write(int(fd), b"R")
            os.close(int(fd))
        except OSError:
            pass


def kill_descendants(grace_s: float = 3.0) -> None:
    """SIGTERM then SIGKILL whatever children this process still has (p2pd, forked workers)."""
    kids = descendants(os.getpid())
    for p in kids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        # reap our own direct children so they do not linger as zombies
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        if not any(os.path.exists(f"/proc/{p}") and not _is_zombie(p) for p in kids):
            return
        time.sleep(0.02)
    for p in kids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def emit(line: dict) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()
