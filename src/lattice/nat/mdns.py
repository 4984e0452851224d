"""LAN peer discovery with multicast DNS, as the libp2p mDNS spec describes it.

Why: peers on one LAN (a lab, a home) should find each other with no bootstrap address and no DHT.
Wire format (libp2p/specs discovery/mdns.md; the answers rust-libp2p sends parse too): a query
``_p2p._udp.local PTR`` to 224.0.0.251:5353; each peer answers ``_p2p._udp.local PTR
<peer-name>._p2p._udp.local`` with TXT records ``dnsaddr=<multiaddr>/p2p/<peer id>`` as additional
records. ``peer-name`` is a random label (not the peer id, which may not fit a DNS label).

The DNS codec is our own and small: every length is checked, name compression pointers must point
backwards and are limited in number, and anything malformed raises :class:`DNSError` only.
"""

from __future__ import annotations

import logging
import random
import secrets
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from lattice.errors import TransportError
from lattice.multiaddr import Multiaddr, MultiaddrError

__all__ = [
    "MDNS",
    "SERVICE_NAME",
    "DNSError",
    "MDNSError",
    "Message",
    "Question",
    "Record",
    "build_query",
    "build_response",
    "decode_message",
    "encode_message",
    "peers_from_response",
]

log = logging.getLogger(__name__)

SERVICE_NAME = "_p2p._udp.local"
TYPE_A, TYPE_PTR, TYPE_TXT, TYPE_AAAA, TYPE_SRV, TYPE_ANY = 1, 12, 16, 28, 33, 255
CLASS_IN = 1
FLAG_RESPONSE = 0x8400  # QR + AA, as RFC 6762 section 18 requires for responses
DEFAULT_TTL = 120

MAX_PACKET = 9000  # RFC 6762 section 17: the largest mDNS message a receiver has to handle
MAX_NAME = 255
MAX_POINTER_HOPS = 16
MAX_RECORDS = 128  # per section; more is abuse on a LAN
MAX_ADDRS_PER_PEER = 32
MAX_PEERS_PER_PACKET = 16
MAX_SEEN = 1024
MAX_PEERS_PER_SOURCE = 16  # peers one LAN address may introduce (a spoofer names thousands; a
# machine running several nodes names a few)


class DNSError(ValueError):
    """A DNS message that cannot be decoded (truncated, looping pointers, over a limit)."""


class MDNSError(TransportError):
    """mDNS could not start (no socket on the port, no interface joined the group)."""


@dataclass(frozen=True, slots=True)
class Question:
    name: str
    qtype: int = TYPE_PTR
    qclass: int = CLASS_IN  # the top bit is mDNS "unicast response requested"


@dataclass(frozen=True, slots=True)
class Record:
    """A resource record; ``target`` holds PTR data, ``strings`` TXT data, ``raw`` anything else."""

    name: str
    rtype: int
    ttl: int = DEFAULT_TTL
    rclass: int = CLASS_IN  # the top bit is mDNS "cache flush"
    target: str = ""
    strings: tuple[bytes, ...] = ()
    raw: bytes = b""


@dataclass(slots=True)
class Message:
    id: int = 0
    flags: int = 0
    questions: list[Question] = field(default_factory=list)
    answers: list[Record] = field(default_factory=list)
    authorities: list[Record] = field(default_factory=list)
    additionals: list[Record] = field(default_factory=list)

    @property
    def is_response(self) -> bool:
        return bool(self.flags & 0x8000)


# ---------------------------------------------------------------------------------------- encoding


def _encode_name(name: str, out: bytearray, offsets: dict[str, int]) -> None:
    labels = [label for label in name.split(".") if label] if name else []
    total = 1
    for i in range(len(labels)):
        suffix = ".".join(labels[i:]).lower()
        if suffix in offsets:
            out += struct.pack("!H", 0xC000 | offsets[suffix])
            return
        raw = labels[i].encode("utf-8")
        if len(raw) > 63:
            raise DNSError(f"DNS label longer than 63 bytes in {name!r}")
        total += len(raw) + 1
        if total > MAX_NAME:
            raise DNSError(f"DNS name longer than {MAX_NAME} bytes: {name!r}")
        if len(out) < 0x4000:
            offsets[suffix] = len(out)
        out.append(len(raw))
        out += raw
    out.append(0)


def encode_message(msg: Message) -> bytes:
    """Encode with name compression; raises DNSError for names or strings over DNS limits."""
    out = bytearray(
        struct.pack(
            "!6H",
            msg.id,
            msg.flags,
            len(msg.questions),
            len(msg.answers),
            len(msg.authorities),
            len(msg.additionals),
        )
    )
    offsets: dict[str, int] = {}
    for q in msg.questions:
        _encode_name(q.name, out, offsets)
        out += struct.pack("!HH", q.qtype, q.qclass)
    for rec in (*msg.answers, *msg.authorities, *msg.additionals):
        _encode_name(rec.name, out, offsets)
        out += struct.pack("!HHI", rec.rtype, rec.rclass, rec.ttl)
        length_at = len(out)
        out += b"\0\0"
        if rec.rtype == TYPE_PTR:
            _encode_name(rec.target, out, offsets)
        elif rec.rtype == TYPE_TXT:
            for s in rec.strings or (b"",):
                if len(s) > 255:
                    raise DNSError("TXT string longer than 255 bytes")
                out.append(len(s))
                out += s
        else:
            out += rec.raw
        rdlength = len(out) - length_at - 2
        if rdlength > 0xFFFF:
            raise DNSError("record data too long")
        struct.pack_into("!H", out, length_at, rdlength)
    return bytes(out)


# ---------------------------------------------------------------------------------------- decoding


def _decode_name(data: bytes, pos: int) -> tuple[str, int]:
    """Return (name, position after the name in the original stream)."""
    labels: list[str] = []
    total = 1
    hops = 0
    end: int | None = None
    limit = pos  # a pointer must point strictly before the name part that contains it
    while True:
        if pos >= len(data):
            raise DNSError("truncated name")
        length = data[pos]
        if length & 0xC0 == 0xC0:
            if pos + 1 >= len(data):
                raise DNSError("truncated name pointer")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if end is None:
                end = pos + 2
            hops += 1
            if hops > MAX_POINTER_HOPS or target >= limit:
                raise DNSError("bad or looping name compression pointer")
            pos = limit = target
            continue
        if length & 0xC0:
            raise DNSError("unsupported label type")
        if length == 0:
            return ".".join(labels), (end if end is not None else pos + 1)
        total += length + 1
        if total > MAX_NAME or pos + 1 + length > len(data):
            raise DNSError("name too long or truncated")
        labels.append(data[pos + 1 : pos + 1 + length].decode("utf-8", "replace"))
        pos += 1 + length


def _decode_record(data: bytes, pos: int) -> tuple[Record, int]:
    name, pos = _decode_name(data, pos)
    if pos + 10 > len(data):
        raise DNSError("truncated record header")
    rtype, rclass, ttl, rdlength = struct.unpack_from("!HHIH", data, pos)
    pos += 10
    end = pos + rdlength
    if end > len(data):
        raise DNSError("truncated record data")
    if rtype == TYPE_PTR:
        target, after = _decode_name(data, pos)
        if after != end:
            raise DNSError("PTR record length mismatch")
        return Record(name, rtype, ttl, rclass, target=target), end
    if rtype == TYPE_TXT:
        strings: list[bytes] = []
        p = pos
        while p < end:
            n = data[p]
            if p + 1 + n > end:
                raise DNSError("truncated TXT string")
            strings.append(data[p + 1 : p + 1 + n])
            p += 1 + n
        return Record(name, rtype, ttl, rclass, strings=tuple(strings)), end
    return Record(name, rtype, ttl, rclass, raw=data[pos:end]), end


def decode_message(data: bytes) -> Message:
    """Decode a DNS message; raises DNSError (only) for anything malformed or over a limit."""
    if len(data) > MAX_PACKET:
        raise DNSError("DNS message too large")
    if len(data) < 12:
        raise DNSError("DNS message shorter than its header")
    msg_id, flags, qd, an, ns, ar = struct.unpack_from("!6H", data, 0)
    if max(qd, an, ns, ar) > MAX_RECORDS:
        raise DNSError("too many records")
    msg = Message(msg_id, flags)
    pos = 12
    for _ in range(qd):
        name, pos = _decode_name(data, pos)
        if pos + 4 > len(data):
            raise DNSError("truncated question")
        qtype, qclass = struct.unpack_from("!HH", data, pos)
        pos += 4
        msg.questions.append(Question(name, qtype, qclass))
    for count, section in ((an, msg.answers), (ns, msg.authorities), (ar, msg.additionals)):
        for _ in range(count):
            rec, pos = _decode_record(data, pos)
            section.append(rec)
    return msg


# -------------------------------------------------------------------------------- libp2p messages


def build_query() -> bytes:
    """The "find all peers" query (id 0, as mDNS wants)."""
    return encode_message(Message(questions=[Question(SERVICE_NAME, TYPE_PTR)]))


def build_response(peer_name: str, peer_id: str, addrs: list[Multiaddr], ttl: int = DEFAULT_TTL) -> bytes:
    """Our answer: the PTR to our instance name plus one TXT ``dnsaddr=`` record per address."""
    instance = f"{peer_name}.{SERVICE_NAME}"
    txts = []
    for addr in addrs:
        try:
            full = str(Multiaddr.parse(str(addr)).without_peer()) + f"/p2p/{peer_id}"
        except MultiaddrError:
            continue
        value = f"dnsaddr={full}".encode()
        if len(value) <= 255:
            txts.append(Record(instance, TYPE_TXT, ttl, strings=(value,)))
    msg = Message(flags=FLAG_RESPONSE, answers=[Record(SERVICE_NAME, TYPE_PTR, ttl, target=instance)])
    msg.additionals = txts[:MAX_ADDRS_PER_PEER]
    data = encode_message(msg)
    while len(data) > 1400 and msg.additionals:  # stay in one unfragmented datagram
        msg.additionals.pop()
        data = encode_message(msg)
    return data


def peers_from_response(msg: Message) -> dict[str, list[Multiaddr]]:
    """Peer id -> addresses (without /p2p/) announced in a response; bad entries are skipped."""
    # rust-libp2p's PTR target is the bare peer name, the spec's is <peer-name>._p2p._udp.local: take both
    instances = [
        r.target.lower() for r in msg.answers if r.rtype == TYPE_PTR and r.name.lower() == SERVICE_NAME
    ]
    peers: dict[str, list[Multiaddr]] = {}
    for instance in instances[:MAX_PEERS_PER_PACKET]:
        peer: str | None = None
        addrs: list[Multiaddr] = []
        for rec in (*msg.answers, *msg.additionals):
            if rec.rtype != TYPE_TXT or rec.name.lower() != instance:
                continue
            for s in rec.strings:
                if not s.startswith(b"dnsaddr=") or len(addrs) >= MAX_ADDRS_PER_PEER:
                    continue
                try:
                    addr = Multiaddr.parse(s[8:].decode("utf-8"))
                except (UnicodeDecodeError, MultiaddrError):
                    continue
                if not addr.parts or addr.parts[-1][0] != "p2p":
                    continue
                pid = addr.parts[-1][1]
                if peer is None:
                    peer = pid
                if pid == peer and addr.without_peer() not in addrs:
                    addrs.append(addr.without_peer())
        if peer is not None:
            merged = peers.setdefault(peer, [])
            for addr in addrs:
                if addr not in merged:
                    merged.append(addr)
    return peers


# ---------------------------------------------------------------------------------------- service


def _ipv4_interfaces() -> list[str]:
    import ifaddr

    ips = {ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if isinstance(ip.ip, str)}
    return sorted(ips)


class MDNS:
    """Announce this peer and discover others on the LAN; see the module docstring for the wire format.

    ``addrs`` is called at each answer so the announced addresses follow the node's listeners;
    ``on_peer(peer_id, addrs)`` is called for each other peer heard (addresses without /p2p/), again
    when its addresses change, and at most once per ``interval`` otherwise. A peer may spread its
    addresses over several answers (rust-libp2p does), so merge what you get rather than replace.
    """

    def __init__(
        self,
        peer_id: str,
        addrs: Callable[[], list[Multiaddr]],
        on_peer: Callable[[str, list[Multiaddr]], None],
        interval: float = 10.0,
        port: int = 5353,
        group: str = "224.0.0.251",
        interfaces: list[str] | None = None,
        min_answer_interval: float = 1.0,
    ) -> None:
        self.peer_id = peer_id
        self.peer_name = secrets.token_hex(16)  # 32 lower-case alphanumerics, as the spec asks
        self.addrs = addrs
        self.on_peer = on_peer
        self.interval = interval
        self.port = port
        self.group = group
        self.interfaces = interfaces  # IPv4 addresses of the interfaces to use; None: all of them
        self.min_answer_interval = min_answer_interval  # RFC 6762: at most one multicast per second
        self._answer_wanted = trio.Event()
        self._seen: dict[str, tuple[tuple[Multiaddr, ...], float]] = {}
        self._by_source: dict[str, set[str]] = {}  # source address -> peers it introduced (bounded)
        self.ignored = 0  # announcements over a source's share
        self._sock: trio.socket.SocketType | None = None
        self._joined: list[str] = []
        self._send_lock = trio.Lock()
        self.queries_sent = 0
        self.answers_sent = 0

    # -- sans-IO part: decide what a datagram means, without touching sockets

    def handle_packet(self, data: bytes, source: str | None = None) -> bool:
        """Process one datagram; return True when it asks for our answer. Never raises on bad input."""
        try:
            msg = decode_message(data)
        except DNSError as exc:
            log.debug("mdns: dropping malformed packet: %s", exc)
            return False
        if not msg.is_response:
            own = f"{self.peer_name}.{SERVICE_NAME}"  # some tools query the instance directly
            return any(
                q.name.lower() in (SERVICE_NAME, own) and q.qtype in (TYPE_PTR, TYPE_TXT, TYPE_ANY)
                for q in msg.questions
            )
        for peer, addrs in peers_from_response(msg).items():
            if peer == self.peer_id or not addrs or not self._from_fair_source(peer, source):
                continue
            self._report(peer, addrs)
        return False

    def _from_fair_source(self, peer: str, source: str | None) -> bool:
        """One LAN address introduces at most MAX_PEERS_PER_SOURCE peers: a host announcing
        thousands of made-up peers cannot push the real ones out of discovery."""
        if source is None:
            return True
        peers = self._by_source.get(source)
        if peers is None:
            if len(self._by_source) >= MAX_SEEN:
                self._by_source.pop(next(iter(self._by_source)))
            peers = self._by_source[source] = set()
        if peer in peers:
            return True
        if len(peers) >= MAX_PEERS_PER_SOURCE:
            self.ignored += 1
            return False
        peers.add(peer)
        return True

    def _report(self, peer: str, addrs: list[Multiaddr]) -> None:
        now = time.monotonic()
        key = tuple(addrs)
        previous = self._seen.get(peer)
        if previous is not None and previous[0] == key and now - previous[1] < self.interval:
            return
        if previous is None and len(self._seen) >= MAX_SEEN:
            oldest = min(self._seen, key=lambda p: self._seen[p][1])
            del self._seen[oldest]
        self._seen[peer] = (key, now)
        log.debug("mdns: peer %s at %s", peer, [str(a) for a in addrs])
        try:
            self.on_peer(peer, list(addrs))
        except Exception:
            log.exception("mdns: on_peer callback failed")

    def response(self) -> bytes:
        return build_response(self.peer_name, self.peer_id, list(self.addrs()))

    # -- IO part

    async def _open(self) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)  # peers on this host
            await sock.bind(("", self.port))
        except OSError as exc:
            sock.close()
            raise MDNSError(f"mDNS: cannot bind UDP port {self.port}: {exc}") from None
        group = socket.inet_aton(self.group)
        joined = []
        for ip in self.interfaces if self.interfaces is not None else _ipv4_interfaces():
            try:
                mreq = struct.pack("4s4s", group, socket.inet_aton(ip))
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
                joined.append(ip)
            except OSError as exc:
                log.debug("mdns: cannot join %s on %s: %s", self.group, ip, exc)
        if not joined:
            sock.close()
            raise MDNSError(f"mDNS: could not join {self.group} on any IPv4 interface")
        self._sock, self._joined = sock, joined

    async def _send(self, data: bytes) -> None:
        """Multicast on every joined interface (one socket: set the outgoing interface per send)."""
        assert self._sock is not None
        async with self._send_lock:
            for ip in self._joined:
                try:
                    self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(ip))
                    await self._sock.sendto(data, (self.group, self.port))
                except OSError as exc:
                    log.debug("mdns: send on %s failed: %s", ip, exc)

    async def query(self) -> None:
        """Ask every peer on the LAN to announce itself now."""
        await self._send(build_query())
        self.queries_sent += 1

    async def _answerer(self) -> None:
        while True:
            await self._answer_wanted.wait()
            self._answer_wanted = trio.Event()
            await trio.sleep(random.uniform(0.02, 0.12))  # RFC 6762 5.2: spread shared answers
            try:
                data = self.response()
            except Exception:
                log.exception("mdns: cannot build answer")
                data = b""
            if data:
                await self._send(data)
                self.answers_sent += 1
            await trio.sleep(self.min_answer_interval)  # later queries get one answer after this

    async def _querier(self) -> None:
        await self.query()
        await trio.sleep(1.0)  # a second early query in case the first one was lost
        while True:
            await self.query()
            await trio.sleep(self.interval * random.uniform(0.9, 1.1))

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join the group, query now and every ``interval``, answer queries; runs until cancelled.

        Raises MDNSError before ``task_status.started()`` when the socket cannot be set up.
        """
        await self._open()
        assert self._sock is not None
        log.info("mdns: discovering peers on %s:%d via %s", self.group, self.port, ", ".join(self._joined))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._answerer)
                nursery.start_soon(self._querier)
                task_status.started()
                while True:
                    try:
                        data, source = await self._sock.recvfrom(MAX_PACKET + 1)
                    except OSError as exc:  # e.g. ICMP errors surfacing on the socket
                        log.debug("mdns: receive failed: %s", exc)
                        await trio.sleep(0.1)
                        continue
                    if self.handle_packet(data, str(source[0]) if source else None):
                        self._answer_wanted.set()
        finally:
            self._sock.close()
            self._sock = None
