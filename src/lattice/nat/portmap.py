"""Ask the home router to forward a TCP port to us: NAT-PMP (RFC 6886) first, then UPnP IGD.

Why: behind a consumer NAT a node cannot be dialed; a port mapping makes it directly reachable
without a relay or hole punching. Opt-in (``--upnp``): it changes the router's configuration.

Everything here treats the router as untrusted: every wait has a timeout (``timeout``, 2 s by
default), every HTTP response and XML document has a size limit, HTTP is parsed and framed by
``h11`` (a URL with control characters is refused, not written into a request), XML is parsed by
``defusedxml`` with DOCTYPE and entity declarations refused (the stdlib parser would expand
entities), the description and control URLs must live on the host that answered the SSDP search,
and no failure propagates: :meth:`PortMapper.map` logs the
reason, keeps it in ``last_error`` and returns None.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import random
import socket
import struct
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit
from xml.sax.saxutils import escape

import defusedxml.ElementTree
import h11
import trio
from defusedxml import DefusedXmlException

from lattice.errors import TransportError
from lattice.multiaddr import Multiaddr

__all__ = [
    "Mapping",
    "PortMapError",
    "PortMapper",
    "default_gateway",
    "external_multiaddr",
    "parse_http_response",
    "parse_ssdp_response",
    "parse_xml",
]

log = logging.getLogger(__name__)

NATPMP_PORT = 5351
SSDP_ADDR = ("239.255.255.250", 1900)
IGD_DEVICES = (
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
)
WAN_SERVICES = (  # in order of preference
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
MAX_SSDP = 2048
MAX_HEADERS = 16 * 1024
MAX_DESCRIPTION = 128 * 1024
MAX_SOAP = 32 * 1024
MAX_LOCATIONS = 4

_NATPMP_RESULTS = {
    1: "unsupported version",
    2: "not authorized / refused",
    3: "network failure",
    4: "out of resources",
    5: "unsupported opcode",
}


class PortMapError(TransportError):
    """Why one port-mapping attempt failed (logged; the public API returns None instead)."""


class UPnPError(PortMapError):
    """A SOAP fault from the IGD, with its UPnP error code (718: conflict, 725: only permanent)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Mapping:
    """A port mapping the router granted: ``external_ip:external_port`` reaches our ``internal_port``."""

    external_ip: str
    external_port: int
    internal_port: int
    protocol: str  # "TCP"
    method: str  # "natpmp" | "upnp"
    lifetime: int  # seconds granted; 0 = permanent (UPnP routers that refuse leases)
    expires_at: float  # time.time() of expiry; inf when permanent
    gateway: str  # the router's LAN address
    control_url: str = ""  # UPnP only
    service_type: str = ""  # UPnP only
    internal_ip: str = ""  # UPnP only: the LAN address the router forwards to

    @property
    def is_public(self) -> bool:
        """False behind a second NAT (carrier-grade NAT): the external address is not on the internet."""
        try:
            return ipaddress.ip_address(self.external_ip).is_global
        except ValueError:
            return False


def external_multiaddr(mapping: Mapping) -> Multiaddr:
    """The address other peers can dial, to announce next to the listen addresses."""
    return Multiaddr.parse(f"/ip4/{mapping.external_ip}/tcp/{mapping.external_port}")


def default_gateway() -> str | None:
    """The IPv4 default gateway of this network namespace (Linux /proc/net/route), or None."""
    try:
        with open("/proc/net/route") as f:
            lines = f.read(64 * 1024).splitlines()[1:]
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for line in lines:
        cols = line.split()
        if len(cols) < 8 or cols[1] != "00000000" or cols[7] != "00000000":
            continue
        try:
            flags, metric = int(cols[3], 16), int(cols[6])
            gateway = socket.inet_ntoa(struct.pack("<I", int(cols[2], 16)))
        except (ValueError, struct.error):
            continue
        if flags & 0x3 == 0x3 and (best is None or metric < best[0]):  # RTF_UP | RTF_GATEWAY
            best = (metric, gateway)
    return best[1] if best else None


def parse_xml(data: bytes, limit: int) -> ET.Element:
    """Parse an untrusted XML document: size-bounded, UTF-8 only, no DOCTYPE or entity declarations."""
    if len(data) > limit:
        raise PortMapError(f"XML document of {len(data)} bytes is over the {limit} byte limit")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PortMapError("XML document is not UTF-8")
    try:  # a str is always parsed as UTF-8, whatever the declaration says
        return defusedxml.ElementTree.fromstring(text, forbid_dtd=True)
    except DefusedXmlException:
        raise PortMapError("XML document with a DOCTYPE or ENTITY declaration refused")
    except ET.ParseError as exc:
        raise PortMapError(f"malformed XML: {exc}")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(el: ET.Element, name: str) -> str:
    for child in el:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return ""


def parse_ssdp_response(data: bytes) -> dict[str, str] | None:
    """Headers (lower-case names) of an SSDP ``HTTP/1.1 200`` answer, or None if it is not one."""
    if len(data) > MAX_SSDP:
        return None
    conn, _ = _client("M-SEARCH", "*", "239.255.255.250:1900", {}, None)
    conn.receive_data(data)
    conn.receive_data(b"")  # one datagram is the whole answer
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Response) or event.status_code != 200:
        return None
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in event.headers}


@dataclass(frozen=True, slots=True)
class _IGD:
    host: str
    control_url: str
    service_type: str
    local_ip: str


def _client(
    method: str, target: str, host: str, headers: dict[str, str], body: bytes | None
) -> tuple[h11.Connection, bytes]:
    """An h11 client connection that has sent one request (``Connection: close``), and its bytes."""
    fields = [
        ("Host", host),
        ("Connection", "close"),
        ("User-Agent", "lattice/0.1 UPnP/1.1"),
        *headers.items(),
    ]
    if body is not None:
        fields.append(("Content-Length", str(len(body))))
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADERS)
    try:
        data = conn.send(h11.Request(method=method, target=target, headers=fields))
    except h11.LocalProtocolError as exc:  # control characters in a URL the router gave us
        raise PortMapError(f"cannot request {host}{target[:100]!r}: {exc}")
    if body:
        data += conn.send(h11.Data(data=body))
    return conn, data + conn.send(h11.EndOfMessage())


class _ResponseReader:
    """One HTTP response read by h11 as its bytes arrive, the body bounded to ``max_body`` bytes."""

    def __init__(self, conn: h11.Connection, max_body: int, url: str) -> None:
        self._conn = conn
        self._max_body = max_body
        self._url = url
        self._status: int | None = None
        self._body = bytearray()

    def feed(self, data: bytes) -> tuple[int, bytes] | None:
        """(status, body) once the response is complete, None while it is not; ``b""`` = closed."""
        self._conn.receive_data(data)
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                why = "truncated" if not data else "bad"
                raise PortMapError(f"{why} HTTP response from {self._url}: {exc}")
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.Response):
                self._status = event.status_code
                self._check_length(event.headers)
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > self._max_body:
                    raise PortMapError(f"HTTP body from {self._url} is over the {self._max_body} byte limit")
            elif isinstance(event, h11.EndOfMessage) and self._status is not None:
                return self._status, bytes(self._body)
            elif isinstance(event, h11.ConnectionClosed):
                raise PortMapError(f"truncated HTTP response from {self._url}")

    def _check_length(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        for name, value in headers:
            if name == b"content-length" and int(value) > self._max_body:
                raise PortMapError(f"HTTP body of {int(value)} bytes is over the {self._max_body} byte limit")


def parse_http_response(data: bytes, max_body: int, url: str, method: str = "GET") -> tuple[int, bytes]:
    """(status, body) of a complete HTTP response to ``method`` (the connection closed after it)."""
    conn, _ = _client(method, "/", urlsplit(url).netloc or "localhost", {}, None)
    reader = _ResponseReader(conn, max_body, url)
    result = reader.feed(data) or reader.feed(b"")
    if result is None:
        raise PortMapError(f"truncated HTTP response from {url}")
    return result


async def _http(
    url: str, max_body: int, timeout: float, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """A bounded HTTP/1.1 GET or POST (``Connection: close``): (status, body)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise PortMapError(f"unsupported URL {url!r}")
    try:
        port = parts.port or 80
    except ValueError:
        raise PortMapError(f"bad port in URL {url!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    method = "POST" if body is not None else "GET"
    conn, request = _client(method, path, f"{parts.hostname}:{port}", headers or {}, body)
    reader = _ResponseReader(conn, max_body, url)
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(parts.hostname, port)
            async with stream:
                await stream.send_all(request)
                while (result := reader.feed(await stream.receive_some(65536))) is None:
                    pass
    except trio.TooSlowError:
        raise PortMapError(f"HTTP request to {url} timed out after {timeout} s")
    except OSError as exc:
        raise PortMapError(f"HTTP request to {url} failed: {exc}")
    return result


def _same_host(url: str, host: str) -> bool:
    try:
        hostname = urlsplit(url).hostname
        return hostname is not None and ipaddress.ip_address(hostname) == ipaddress.ip_address(host)
    except ValueError:
        return False


def _local_ip_towards(host: str) -> str:
    """The local address the kernel would use to reach ``host`` (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]


def _notify(on_change: Callable[[int, Mapping | None], None] | None, port: int, m: Mapping | None) -> None:
    if on_change is None:
        return
    try:
        on_change(port, m)
    except Exception:
        log.exception("portmap: on_change callback failed")


class PortMapper:
    """Obtain, renew and delete TCP port mappings on the local router.

    Use: ``m = await mapper.map(port)``; run ``mapper.run_renewals`` in a nursery while the node
    runs; ``await mapper.aclose()`` on shutdown (deletes the mappings). ``gateway`` overrides the
    default route's gateway for NAT-PMP; ``ssdp_addr`` and ``natpmp_port`` exist for tests.
    """

    def __init__(
        self,
        gateway: str | None = None,
        *,
        methods: Sequence[str] = ("natpmp", "upnp"),
        timeout: float = 2.0,
        natpmp_port: int = NATPMP_PORT,
        ssdp_addr: tuple[str, int] = SSDP_ADDR,
        description: str = "lattice",
    ) -> None:
        unknown = set(methods) - {"natpmp", "upnp"}
        if unknown:
            raise ValueError(f"unknown port mapping methods {sorted(unknown)}")
        self.gateway = gateway
        self.methods = tuple(methods)
        self.timeout = timeout
        self.natpmp_port = natpmp_port
        self.ssdp_addr = ssdp_addr
        self.description = description
        self.mappings: dict[int, Mapping] = {}  # internal port -> current mapping
        self.last_error: str | None = None
        self._wanted: dict[int, int] = {}  # internal port -> requested lifetime
        self._next: dict[int, float] = {}  # internal port -> time.time() of the next renewal
        self._changed = trio.Event()
        self._igd: _IGD | None = None

    # ------------------------------------------------------------------------------ public API

    async def map(self, internal_port: int, lifetime: int = 3600) -> Mapping | None:
        """Map TCP ``internal_port`` (trying each method in order); None when no router agreed."""
        if not 0 < internal_port < 65536 or lifetime <= 0:
            raise ValueError("internal_port must be 1..65535 and lifetime positive")
        mapping = await self._obtain(internal_port, lifetime, internal_port)
        if mapping is not None:
            self._wanted[internal_port] = lifetime
            self._set(internal_port, mapping)
        return mapping

    async def unmap(self, mapping: Mapping) -> bool:
        """Delete a mapping on the router (bounded, and done even while being cancelled)."""
        self._wanted.pop(mapping.internal_port, None)
        self._next.pop(mapping.internal_port, None)
        if self.mappings.get(mapping.internal_port) == mapping:
            del self.mappings[mapping.internal_port]
        self._changed.set()
        with trio.CancelScope(shield=True), trio.move_on_after(self.timeout * 2):
            try:
                if mapping.method == "natpmp":
                    await self._natpmp_map(mapping.gateway, mapping.internal_port, 0, 0)
                else:
                    await self._upnp_delete(mapping)
                log.info("portmap: deleted %s mapping of TCP %d", mapping.method, mapping.internal_port)
                return True
            except Exception as exc:
                log.warning(
                    "portmap: could not delete %s mapping of TCP %d: %s",
                    mapping.method,
                    mapping.internal_port,
                    exc,
                )
        return False

    async def aclose(self) -> None:
        """Delete every mapping this mapper holds."""
        for mapping in list(self.mappings.values()):
            await self.unmap(mapping)
        self._wanted.clear()

    async def run_renewals(
        self,
        on_change: Callable[[int, Mapping | None], None] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Renew each mapping at half its lifetime; runs until cancelled.

        ``on_change(internal_port, mapping)`` is called when the external address or port changes,
        with None when a mapping is lost (it is then retried every minute), and when it comes back.
        """
        task_status.started()
        while True:
            self._changed = trio.Event()
            if not self._next:
                await self._changed.wait()
                continue
            port = min(self._next, key=self._next.__getitem__)
            with trio.move_on_after(max(0.0, self._next[port] - time.time())):
                await self._changed.wait()
                continue
            await self._renew(port, on_change)

    # ------------------------------------------------------------------------------ internals

    def _set(self, port: int, mapping: Mapping) -> None:
        self.mappings[port] = mapping
        half = (mapping.lifetime or self._wanted.get(port, 3600)) / 2
        self._next[port] = time.time() + max(1.0, half)
        self._changed.set()

    async def _obtain(self, internal_port: int, lifetime: int, suggested: int) -> Mapping | None:
        errors = []
        for method in self.methods:
            label = {"natpmp": "NAT-PMP", "upnp": "UPnP"}[method]
            try:
                with trio.fail_after(self.timeout * 4):  # every step is bounded; so is the whole
                    if method == "natpmp":
                        gateway = self.gateway or default_gateway()
                        if gateway is None:
                            raise PortMapError("no IPv4 default gateway")
                        mapping = await self._natpmp_map(gateway, internal_port, suggested, lifetime)
                    else:
                        mapping = await self._upnp_map(internal_port, suggested, lifetime)
            except trio.TooSlowError:
                errors.append(f"{label}: gave up after {self.timeout * 4} s")
                log.info("portmap: %s gave up on TCP %d after %s s", label, internal_port, self.timeout * 4)
                continue
            except PortMapError as exc:
                errors.append(f"{label}: {exc}")
                log.info("portmap: %s failed for TCP %d: %s", label, internal_port, exc)
                continue
            except Exception as exc:  # a router we do not understand must not take the node down
                errors.append(f"{label}: unexpected {type(exc).__name__}: {exc}")
                log.warning("portmap: %s failed for TCP %d", label, internal_port, exc_info=True)
                continue
            self.last_error = None
            log.info(
                "portmap: %s mapped TCP %d -> %s:%d (lifetime %s s)",
                label,
                internal_port,
                mapping.external_ip,
                mapping.external_port,
                mapping.lifetime or "permanent",
            )
            if not mapping.is_public:
                log.warning("portmap: external address %s is not public (double NAT?)", mapping.external_ip)
            return mapping
        self.last_error = "; ".join(errors) or "no method configured"
        log.warning("portmap: no port mapping for TCP %d: %s", internal_port, self.last_error)
        return None

    async def _renew(self, port: int, on_change: Callable[[int, Mapping | None], None] | None) -> None:
        old = self.mappings.get(port)
        lifetime = self._wanted.get(port, 3600)
        new: Mapping | None = None
        try:
            if old is None:
                new = await self._obtain(port, lifetime, port)
            elif old.method == "natpmp":
                new = await self._natpmp_map(old.gateway, port, old.external_port, lifetime)
            else:
                new = await self._upnp_renew(old, lifetime)
        except Exception as exc:
            log.warning(
                "portmap: renewing the %s mapping of TCP %d failed: %s", old.method if old else "", port, exc
            )
        if port not in self._wanted:  # unmapped while we were renewing: do not leave it behind
            if new is not None:
                await self.unmap(new)
            return
        if new is not None:
            log.debug("portmap: renewed TCP %d -> %s:%d", port, new.external_ip, new.external_port)
            self._set(port, new)
            if old is None or (old.external_ip, old.external_port) != (new.external_ip, new.external_port):
                _notify(on_change, port, new)
            return
        now = time.time()
        if old is not None and now >= old.expires_at:
            log.warning("portmap: the mapping of TCP %d expired", port)
            del self.mappings[port]
            old = None
            _notify(on_change, port, None)
        self._next[port] = now + (60.0 if old is None else max(1.0, min(60.0, (old.expires_at - now) / 2)))

    # -- NAT-PMP (RFC 6886)

    async def _natpmp_request(self, gateway: str, request: bytes, opcode: int, size: int) -> bytes:
        """Send with the RFC's doubling retransmission (from 250 ms) until ``timeout``; return the answer."""
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            try:
                await sock.connect((gateway, self.natpmp_port))  # and the kernel drops other sources
            except OSError as exc:
                raise PortMapError(f"cannot reach {gateway}: {exc}")
            deadline = trio.current_time() + self.timeout
            delay = 0.25
            malformed = 0
            while trio.current_time() < deadline:
                try:
                    await sock.send(request)
                    with trio.move_on_at(min(deadline, trio.current_time() + delay)):
                        while True:
                            data = await sock.recv(64)
                            if len(data) < 4 or data[0] != 0 or data[1] != opcode:
                                malformed += 1
                                continue
                            result = struct.unpack_from("!H", data, 2)[0]
                            if result:
                                meaning = _NATPMP_RESULTS.get(result, "unknown")
                                raise PortMapError(f"gateway {gateway} refused: result {result} ({meaning})")
                            if len(data) < size:
                                malformed += 1
                                continue
                            return data
                except OSError as exc:  # ICMP port unreachable: no NAT-PMP on this router
                    raise PortMapError(f"no service at {gateway}:{self.natpmp_port} ({exc})")
                delay *= 2
            extra = f" ({malformed} malformed replies ignored)" if malformed else ""
            raise PortMapError(f"no answer from {gateway}:{self.natpmp_port} in {self.timeout} s{extra}")

    async def _natpmp_map(self, gateway: str, internal_port: int, suggested: int, lifetime: int) -> Mapping:
        """Map (or with lifetime 0 delete) TCP ``internal_port``; also asks for the external address."""
        request = struct.pack("!BBHHHI", 0, 2, 0, internal_port, suggested, lifetime)
        reply = await self._natpmp_request(gateway, request, 130, 16)
        _, _, _, _, got_internal, external_port, granted = struct.unpack_from("!BBHIHHI", reply)
        if got_internal != internal_port:
            raise PortMapError(f"answer for port {got_internal}, asked for {internal_port}")
        if lifetime == 0:
            return Mapping("", 0, internal_port, "TCP", "natpmp", 0, 0.0, gateway)
        if external_port == 0 or granted == 0:
            raise PortMapError("gateway granted no port")
        reply = await self._natpmp_request(gateway, b"\x00\x00", 128, 12)
        external_ip = socket.inet_ntoa(reply[8:12])
        if external_ip == "0.0.0.0":
            raise PortMapError("gateway has no external address")
        return Mapping(
            external_ip,
            external_port,
            internal_port,
            "TCP",
            "natpmp",
            granted,
            time.time() + granted,
            gateway,
        )

    # -- UPnP IGD

    async def _discover_igd(self) -> _IGD:
        """SSDP M-SEARCH, then the first description that has a WAN connection service."""
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            try:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
                await sock.bind(("0.0.0.0", 0))
                for device in IGD_DEVICES:
                    search = (
                        "M-SEARCH * HTTP/1.1\r\n"
                        f"HOST: {self.ssdp_addr[0]}:{self.ssdp_addr[1]}\r\n"
                        'MAN: "ssdp:discover"\r\n'
                        "MX: 1\r\n"  # devices answer within a second, inside our timeout
                        f"ST: {device}\r\n\r\n"
                    )
                    await sock.sendto(search.encode(), self.ssdp_addr)
            except OSError as exc:
                raise PortMapError(f"cannot send the SSDP search: {exc}")
            deadline = trio.current_time() + self.timeout
            tried: set[str] = set()
            errors: list[str] = []
            ignored = 0
            while len(tried) < MAX_LOCATIONS:
                location = None
                with trio.move_on_at(deadline):
                    while location is None:
                        try:
                            data, (source, _port) = await sock.recvfrom(MAX_SSDP + 1)
                        except OSError:
                            await trio.sleep(0.05)
                            continue
                        headers = parse_ssdp_response(data)
                        candidate = (headers or {}).get("location", "")
                        if not candidate or not candidate.startswith("http://"):
                            ignored += 1
                        elif not _same_host(candidate, source):
                            ignored += 1
                            log.info(
                                "portmap: ignoring SSDP answer from %s pointing at %s",
                                source,
                                candidate[:100],
                            )
                        elif candidate not in tried:
                            location = candidate
                if location is None:
                    break
                tried.add(location)
                try:
                    return await self._igd_from_description(location)
                except PortMapError as exc:
                    errors.append(str(exc))
                    log.info("portmap: unusable IGD at %s: %s", location, exc)
        if errors:
            raise PortMapError("; ".join(errors))
        extra = f" ({ignored} unusable answers ignored)" if ignored else ""
        raise PortMapError(f"no Internet gateway device answered SSDP within {self.timeout} s{extra}")

    async def _igd_from_description(self, location: str) -> _IGD:
        status, body = await _http(location, MAX_DESCRIPTION, self.timeout)
        if status != 200:
            raise PortMapError(f"device description {location} answered HTTP {status}")
        root = parse_xml(body, MAX_DESCRIPTION)
        base = location
        services: list[tuple[str, str]] = []
        for el in root.iter():
            name = _local(el.tag)
            if name == "URLBase" and (el.text or "").strip():
                base = (el.text or "").strip()
            elif name == "service":
                services.append((_child_text(el, "serviceType"), _child_text(el, "controlURL")))
        host = urlsplit(location).hostname or ""
        for wanted in WAN_SERVICES:
            for service_type, control in services:
                if service_type != wanted or not control:
                    continue
                url = urljoin(base, control)
                if not url.startswith("http://") or not _same_host(url, host):
                    raise PortMapError(f"control URL {url[:100]!r} is not on the device {host}")
                try:
                    local_ip = _local_ip_towards(host)
                except OSError as exc:
                    raise PortMapError(f"no route to the IGD {host}: {exc}")
                return _IGD(host, url, service_type, local_ip)
        raise PortMapError(f"no WANIPConnection/WANPPPConnection service in {location}")

    async def _soap(
        self, control_url: str, service_type: str, action: str, args: dict[str, str]
    ) -> dict[str, str]:
        params = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in args.items())
        body = (
            '<?xml version="1.0"?>\r\n'
            '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
            's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
            f'<u:{action} xmlns:u="{service_type}">{params}</u:{action}>'
            "</s:Body></s:Envelope>\r\n"
        ).encode()
        headers = {"Content-Type": 'text/xml; charset="utf-8"', "SOAPAction": f'"{service_type}#{action}"'}
        status, reply = await _http(control_url, MAX_SOAP, self.timeout, body, headers)
        try:
            root = parse_xml(reply, MAX_SOAP)
        except PortMapError as exc:
            raise PortMapError(f"{action}: HTTP {status} with a bad body: {exc}")
        values = {_local(el.tag): (el.text or "").strip() for el in root.iter() if len(el) == 0}
        if status != 200:
            code, why = values.get("errorCode", ""), values.get("errorDescription", "")
            message = f"{action} failed: HTTP {status}, error {code or '?'} {why[:200]}"
            raise UPnPError(int(code) if code.isdigit() and len(code) < 6 else 0, message.strip())
        return values

    async def _upnp_add(
        self, igd: _IGD, internal_port: int, external_port: int, lifetime: int
    ) -> tuple[int, int]:
        """AddPortMapping with the usual fallbacks; returns (external port, lease)."""
        for _ in range(4):
            args = {
                "NewRemoteHost": "",
                "NewExternalPort": str(external_port),
                "NewProtocol": "TCP",
                "NewInternalPort": str(internal_port),
                "NewInternalClient": igd.local_ip,
                "NewEnabled": "1",
                "NewPortMappingDescription": f"{self.description} {internal_port}",
                "NewLeaseDuration": str(lifetime),
            }
            try:
                await self._soap(igd.control_url, igd.service_type, "AddPortMapping", args)
                return external_port, lifetime
            except UPnPError as exc:
                if exc.code == 725 and lifetime:  # OnlyPermanentLeasesSupported
                    lifetime = 0
                elif exc.code == 718:  # ConflictInMappingEntry: someone else holds that port
                    external_port = random.randint(10000, 60000)
                else:
                    raise
        raise PortMapError("AddPortMapping: no free external port found")

    async def _upnp_finish(self, igd: _IGD, internal_port: int, external_port: int, lease: int) -> Mapping:
        values = await self._soap(igd.control_url, igd.service_type, "GetExternalIPAddress", {})
        external_ip = values.get("NewExternalIPAddress", "")
        try:
            if ipaddress.IPv4Address(external_ip).is_unspecified:
                raise ValueError
        except ValueError:
            raise PortMapError(f"the IGD reports no usable external address ({external_ip[:40]!r})")
        expires = time.time() + lease if lease else math.inf
        return Mapping(
            external_ip,
            external_port,
            internal_port,
            "TCP",
            "upnp",
            lease,
            expires,
            igd.host,
            igd.control_url,
            igd.service_type,
            igd.local_ip,
        )

    async def _upnp_map(self, internal_port: int, suggested: int, lifetime: int) -> Mapping:
        if self._igd is None:
            self._igd = await self._discover_igd()
        igd = self._igd
        try:
            external_port, lease = await self._upnp_add(igd, internal_port, suggested, lifetime)
        except PortMapError:
            self._igd = None  # rediscover next time: the router may have rebooted or changed
            raise
        return await self._upnp_finish(igd, internal_port, external_port, lease)

    async def _upnp_renew(self, old: Mapping, lifetime: int) -> Mapping:
        igd = _IGD(old.gateway, old.control_url, old.service_type, old.internal_ip)
        external_port, lease = await self._upnp_add(igd, old.internal_port, old.external_port, lifetime)
        return await self._upnp_finish(igd, old.internal_port, external_port, lease)

    async def _upnp_delete(self, mapping: Mapping) -> None:
        args = {"NewRemoteHost": "", "NewExternalPort": str(mapping.external_port), "NewProtocol": "TCP"}
        await self._soap(mapping.control_url, mapping.service_type, "DeletePortMapping", args)
