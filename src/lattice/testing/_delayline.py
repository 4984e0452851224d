"""A delay line for the WAN testbed: holds each queued packet for its path delay, then lets it go.

This kernel has no ``netem`` qdisc, so latency, jitter and loss are emulated with NFQUEUE: an
iptables rule queues every packet a host *receives* on its uplink; this process gets the packet's
id and IPv4 header from the kernel (never its payload: the packet stays in the kernel), and gives
the verdict ACCEPT when the delay of the path from the packet's source has passed, or DROP at once
for a lost packet. Delaying on the receiver matters: a packet held on the sender would still be
charged to its socket, and TCP Small Queues would then stall the sender (netem avoids this by
orphaning the packet; we cannot). One process serves every namespace of a testbed (a netlink
socket is bound to the namespace it was made in).

Packets from the same source keep their order (jitter never reorders, like netem with a rate).
With GSO a queued packet is what the sender's TCP handed to its device (up to 64 KiB, about 1 ms of
data at the pacing rate), so a loss drops that whole burst.

Run by :class:`lattice.testing.wan.WanTestbed`: ``python -m lattice.testing._delayline`` reads one
JSON line (a list of queues, see :class:`Queue`), binds them, prints ``ready`` and runs until its
standard input closes.
"""

from __future__ import annotations

import ctypes
import heapq
import json
import os
import random
import select
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33
CLONE_NEWNET = 0x40000000

NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = NFNL_SUBSYS_QUEUE << 8
NFQNL_MSG_VERDICT = NFQNL_MSG_PACKET | 1
NFQNL_MSG_CONFIG = NFQNL_MSG_PACKET | 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_GSO = 4
NFQA_PACKET_HDR, NFQA_PAYLOAD = 1, 10
NFQA_VERDICT_HDR = 2
NF_DROP, NF_ACCEPT = 0, 1

_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
QUEUE_MAXLEN = 1 << 16
"""Packets one queue may hold (the kernel drops beyond it): far above a WAN link's BDP in packets."""


def _attr(kind: int, payload: bytes) -> bytes:
    raw = _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _message(kind: int, flags: int, queue: int, attrs: bytes, seq: int = 0) -> bytes:
    body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack(">H", queue) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def verdict(queue: int, packet_id: int, accept: bool) -> bytes:
    """One NFQNL_MSG_VERDICT message (several may be sent in one datagram)."""
    hdr = struct.pack(">II", NF_ACCEPT if accept else NF_DROP, packet_id)
    return _message(NFQNL_MSG_VERDICT, NLM_F_REQUEST, queue, _attr(NFQA_VERDICT_HDR, hdr))


def bind_message(queue: int) -> bytes:
    """Bind ``queue``, copy only the IPv4 header to us, keep GSO packets whole, raise the length."""
    attrs = _attr(NFQA_CFG_CMD, struct.pack("=BBH", NFQNL_CFG_CMD_BIND, 0, 0))
    attrs += _attr(NFQA_CFG_PARAMS, struct.pack(">IB", 20, NFQNL_COPY_PACKET))
    attrs += _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", QUEUE_MAXLEN))
    attrs += _attr(NFQA_CFG_MASK, struct.pack(">I", NFQA_CFG_F_GSO))
    attrs += _attr(NFQA_CFG_FLAGS, struct.pack(">I", NFQA_CFG_F_GSO))
    return _message(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, queue, attrs, seq=1)


def parse_packets(data: bytes) -> list[tuple[int, bytes]]:
    """(packet id, first bytes of the IPv4 header) of each queued-packet message in a datagram."""
    out = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        if kind == NFQNL_MSG_PACKET:
            packet_id, header = None, b""
            pos, end = offset + _NLMSGHDR.size + 4, offset + length
            while pos + _NLATTR.size <= end:
                alen, atype = _NLATTR.unpack_from(data, pos)
                if alen < _NLATTR.size:
                    break
                atype &= 0x3FFF
                if atype == NFQA_PACKET_HDR:
                    (packet_id,) = struct.unpack_from(">I", data, pos + 4)
                elif atype == NFQA_PAYLOAD:
                    header = bytes(data[pos + 4 : pos + alen])
                pos += (alen + 3) & ~3
            if packet_id is not None:
                out.append((packet_id, header))
        offset += (length + 3) & ~3
    return out


@dataclass
class Queue:
    """One namespace's queue: delay (ms), loss and jitter (ms) per source address, and the
    defaults for sources not listed."""

    netns: str
    queue: int = 0
    delay_ms: dict[str, float] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)
    jitter_ms: dict[str, float] = field(default_factory=dict)
    default_delay_ms: float = 0.0
    default_loss: float = 0.0
    default_jitter_ms: float = 0.0
    sock: socket.socket | None = None
    last: dict[bytes, float] = field(default_factory=dict)  # source -> last release time


def _open_in(netns: str) -> socket.socket:
    """A NETLINK_NETFILTER socket bound inside namespace ``netns`` (a path under /run/netns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(netns, os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)
    sock.bind((0, 0))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
    return sock


def _bind(q: Queue) -> None:
    q.sock = _open_in(q.netns)
    q.sock.send(bind_message(q.queue))
    reply = q.sock.recv(4096)
    _, kind, _, _, _ = _NLMSGHDR.unpack_from(reply)
    if kind == NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", reply, _NLMSGHDR.size)
        if err:
            raise OSError(-err, f"binding NFQUEUE {q.queue} in {q.netns}")
    q.sock.setblocking(False)


def run(queues: list[Queue], stop_fd: int) -> None:
    """Serve ``queues`` until ``stop_fd`` reaches end of file."""
    rng = random.Random()
    by_fd = {q.sock.fileno(): q for q in queues if q.sock is not None}
    pending: list[tuple[float, int, int, int]] = []  # (release at, tie, fd, packet id)
    tie = 0
    delays = {fd: _by_address(q) for fd, q in by_fd.items()}
    out: dict[int, list[bytes]] = {}
    while True:
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
        ready, _, _ = select.select([stop_fd, *by_fd], [], [], timeout)
        now = time.monotonic()
        for fd in ready:
            if fd == stop_fd:
                if not os.read(stop_fd, 4096):
                    return
                continue
            q = by_fd[fd]
            table = delays[fd]
            while True:
                try:
                    data = q.sock.recv(65536)  # type: ignore[union-attr]
                except BlockingIOError:
                    break
                for packet_id, header in parse_packets(data):
                    src = header[12:16]
                    delay, loss, jitter = table.get(src) or (
                        q.default_delay_ms,
                        q.default_loss,
                        q.default_jitter_ms,
                    )
                    if loss and rng.random() < loss:
                        out.setdefault(fd, []).append(verdict(q.queue, packet_id, False))
                        continue
                    at = now + (delay + (rng.uniform(-jitter, jitter) if jitter else 0.0)) / 1000
                    at = max(at, q.last.get(src, 0.0))
                    q.last[src] = at
                    tie += 1
                    heapq.heappush(pending, (at, tie, fd, packet_id))
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, fd, packet_id = heapq.heappop(pending)
            out.setdefault(fd, []).append(verdict(by_fd[fd].queue, packet_id, True))
        for fd, msgs in out.items():
            _send(by_fd[fd].sock, msgs)  # type: ignore[arg-type]
        out.clear()


def _send(sock: socket.socket, msgs: list[bytes]) -> None:
    """Send verdicts, many per datagram (a netlink datagram may hold several messages)."""
    for i in range(0, len(msgs), 256):
        chunk = b"".join(msgs[i : i + 256])
        while True:
            try:
                sock.send(chunk)
                break
            except BlockingIOError:
                select.select([], [sock], [], 0.01)


def _by_address(q: Queue) -> dict[bytes, tuple[float, float, float]]:
    """Source (4 raw bytes) -> (delay ms, loss, jitter ms)."""
    return {
        socket.inet_aton(ip): (
            q.delay_ms[ip],
            q.loss.get(ip, q.default_loss),
            q.jitter_ms.get(ip, q.default_jitter_ms),
        )
        for ip in q.delay_ms
    }


def main() -> None:
    """Read the queues (a JSON list of :class:`Queue` fields) from the first line of stdin."""
    spec = json.loads(sys.stdin.buffer.readline())
    queues = [Queue(**item) for item in spec]
    for q in queues:
        _bind(q)
    try:  # exact release times matter more than fairness here, and we use little CPU
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (AttributeError, OSError):
        pass
    print("ready", flush=True)
    run(queues, sys.stdin.fileno())


if __name__ == "__main__":
    main()
