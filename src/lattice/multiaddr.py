"""Multiaddrs: the subset of the spec a TCP libp2p node needs, in text and binary form.

Supported: ip4, ip6, tcp, udp, dns, dns4, dns6, dnsaddr, p2p, p2p-circuit, quic, quic-v1, ws, wss,
tls, noise. Anything else is an error (clear message), never silently dropped in the middle.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from lattice import _proto
from lattice.errors import ConfigError, IdentityError
from lattice.identity import PeerId

__all__ = ["Multiaddr", "MultiaddrError"]


class MultiaddrError(ConfigError):
    """A malformed or unsupported multiaddr."""


# name -> (code, value kind); kinds: "ip4", "ip6", "port", "str", "peer", None (no value)
_PROTOCOLS: dict[str, tuple[int, str | None]] = {
    "ip4": (4, "ip4"),
    "tcp": (6, "port"),
    "udp": (273, "port"),
    "dns": (53, "str"),
    "dns4": (54, "str"),
    "dns6": (55, "str"),
    "dnsaddr": (56, "str"),
    "ip6": (41, "ip6"),
    "p2p-circuit": (290, None),
    "p2p": (421, "peer"),
    "tls": (448, None),
    "noise": (454, None),
    "quic": (460, None),
    "quic-v1": (461, None),
    "ws": (477, None),
    "wss": (478, None),
}
_BY_CODE = {code: (name, kind) for name, (code, kind) in _PROTOCOLS.items()}
_ALIASES = {"ipfs": "p2p"}
MAX_BINARY_LEN = 1024


@dataclass(frozen=True, slots=True)
class Multiaddr:
    """An immutable multiaddr: a tuple of (protocol name, value or None)."""

    parts: tuple[tuple[str, str | None], ...]

    @classmethod
    def parse(cls, text: str) -> Multiaddr:
        if isinstance(text, Multiaddr):
            return text
        if not isinstance(text, str) or not text.startswith("/"):
            raise MultiaddrError(f"invalid multiaddr {text!r}: must start with '/'")
        if len(text) > 2048:
            raise MultiaddrError("invalid multiaddr: too long")
        tokens = text.split("/")[1:]
        if tokens and tokens[-1] == "":
            tokens.pop()
        parts: list[tuple[str, str | None]] = []
        i = 0
        while i < len(tokens):
            name = _ALIASES.get(tokens[i], tokens[i])
            if name not in _PROTOCOLS:
                raise MultiaddrError(f"invalid multiaddr {text!r}: unknown protocol {tokens[i]!r}")
            kind = _PROTOCOLS[name][1]
            if kind is None:
                parts.append((name, None))
                i += 1
                continue
            if i + 1 >= len(tokens) or tokens[i + 1] == "":
                raise MultiaddrError(f"invalid multiaddr {text!r}: {name} needs a value")
            parts.append((name, _check_value(name, kind, tokens[i + 1], text)))
            i += 2
        if not parts:
            raise MultiaddrError(f"invalid multiaddr {text!r}: empty")
        return cls(tuple(parts))

    @classmethod
    def from_bytes(cls, data: bytes) -> Multiaddr:
        cached = _FROM_BYTES.get(data)
        if cached is not None:
            return cached
        parsed = cls._from_bytes(data)
        _remember(_FROM_BYTES, bytes(data), parsed)
        return parsed

    @classmethod
    def _from_bytes(cls, data: bytes) -> Multiaddr:
        if len(data) > MAX_BINARY_LEN:
            raise MultiaddrError("binary multiaddr too long")
        parts: list[tuple[str, str | None]] = []
        pos = 0
        try:
            while pos < len(data):
                code, pos = _proto.decode_uvarint(data, pos)
                if code not in _BY_CODE:
                    raise MultiaddrError(f"unsupported multiaddr protocol code {code}")
                name, kind = _BY_CODE[code]
                if kind is None:
                    parts.append((name, None))
                    continue
                if kind in ("ip4", "ip6", "port"):
                    size = {"ip4": 4, "ip6": 16, "port": 2}[kind]
                else:
                    size, pos = _proto.decode_uvarint(data, pos)
                if pos + size > len(data):
                    raise MultiaddrError("truncated binary multiaddr")
                raw = data[pos : pos + size]
                pos += size
                if kind == "ip4":
                    value = str(ipaddress.IPv4Address(raw))
                elif kind == "ip6":
                    value = str(ipaddress.IPv6Address(raw))
                elif kind == "port":
                    value = str(int.from_bytes(raw, "big"))
                elif kind == "peer":
                    value = PeerId(raw).to_base58()
                else:
                    value = raw.decode("utf-8")
                    _check_value(name, kind, value, "<binary>")
                parts.append((name, value))
        except MultiaddrError:
            raise
        except (ValueError, IdentityError) as exc:
            raise MultiaddrError(f"malformed binary multiaddr: {exc}") from None
        if not parts:
            raise MultiaddrError("empty binary multiaddr")
        return cls(tuple(parts))

    def to_bytes(self) -> bytes:
        cached = _TO_BYTES.get(self)
        if cached is None:
            cached = self._to_bytes()
            _remember(_TO_BYTES, self, cached)
        return cached

    def _to_bytes(self) -> bytes:
        out = bytearray()
        for name, value in self.parts:
            code, kind = _PROTOCOLS[name]
            out += _proto.encode_uvarint(code)
            if kind is None or value is None:
                continue
            if kind == "ip4":
                out += ipaddress.IPv4Address(value).packed
            elif kind == "ip6":
                out += ipaddress.IPv6Address(value).packed
            elif kind == "port":
                out += int(value).to_bytes(2, "big")
            else:
                raw = PeerId.from_string(value).multihash if kind == "peer" else value.encode()
                out += _proto.delimited(raw)
        return bytes(out)

    def __str__(self) -> str:
        return "".join(f"/{n}" if v is None else f"/{n}/{v}" for n, v in self.parts)

    def __repr__(self) -> str:
        return f"Multiaddr({self})"

    def value_of(self, name: str) -> str | None:
        for n, v in self.parts:
            if n == name:
                return v
        return None

    @property
    def peer_id(self) -> PeerId | None:
        """The last /p2p/ component (the target peer, after any relay part)."""
        for name, value in reversed(self.parts):
            if name == "p2p" and value is not None:
                return PeerId.from_string(value)
        return None

    @property
    def is_relayed(self) -> bool:
        return any(n == "p2p-circuit" for n, _ in self.parts)

    def tcp_target(self) -> tuple[str, int] | None:
        """(host, port) for a direct TCP address (ip4/ip6/dns* + tcp, optional /p2p), else None."""
        if self.is_relayed or len(self.parts) < 2:
            return None
        (net, host), (proto, port) = self.parts[0], self.parts[1]
        if net not in ("ip4", "ip6", "dns", "dns4", "dns6") or proto != "tcp":
            return None
        rest = self.parts[2:]
        if rest and not (len(rest) == 1 and rest[0][0] == "p2p"):
            return None
        assert host is not None and port is not None
        return host, int(port)

    def with_peer(self, peer: PeerId) -> Multiaddr:
        """This address with /p2p/<peer> appended (replacing a trailing one)."""
        parts = list(self.parts)
        if parts and parts[-1][0] == "p2p":
            parts.pop()
        parts.append(("p2p", peer.to_base58()))
        return Multiaddr(tuple(parts))

    def without_peer(self) -> Multiaddr:
        parts = list(self.parts)
        if parts and parts[-1][0] == "p2p":
            parts.pop()
        return Multiaddr(tuple(parts))

    @property
    def ip(self) -> str | None:
        """The IP address of an /ip4 or /ip6 address, else None."""
        net, host = self.parts[0] if self.parts else (None, None)
        return host if net in ("ip4", "ip6") else None

    def circuit(self) -> Multiaddr:
        """This (relay) address followed by /p2p-circuit: where peers reach a relay's client."""
        return Multiaddr((*self.parts, ("p2p-circuit", None)))

    def is_loopback(self) -> bool:
        net, host = self.parts[0]
        if net in ("ip4", "ip6") and host is not None:
            return ipaddress.ip_address(host).is_loopback
        return host == "localhost"


# Peers exchange the same addresses over and over (identify, DHT replies): parse each once.
_FROM_BYTES: dict[bytes, Multiaddr] = {}
_TO_BYTES: dict[Multiaddr, bytes] = {}
_CACHE_MAX = 16384


@functools.lru_cache(maxsize=4096)
def _rank(addr: Multiaddr) -> int:
    if addr.is_relayed:
        return 1
    net, host = addr.parts[0]
    if net not in ("ip4", "ip6") or host is None:
        return 0  # a DNS name: meant to be dialed from anywhere
    ip = ipaddress.ip_address(host)
    if ip.is_loopback:
        return 3
    return 2 if ip.is_private or ip.is_link_local else 0


def is_public(addr: Multiaddr) -> bool:
    """A direct address dialable from anywhere (a DNS name, or an IP neither private nor loopback)."""
    return not addr.is_relayed and _rank(addr) == 0


def dialable(addrs: list[Multiaddr], limit: int = 8) -> list[Multiaddr]:
    """The addresses others can dial (TCP or relayed), best first: public, relayed, private,
    loopback. What we tell other peers is cut to ``limit``, so the order decides what survives."""
    usable = [a for a in addrs if a.tcp_target() or a.is_relayed]
    return sorted(dict.fromkeys(usable), key=_rank)[:limit]


def _remember(cache: dict, key, value) -> None:
    if len(cache) >= _CACHE_MAX:
        cache.clear()
    cache[key] = value


def _check_value(name: str, kind: str, value: str, text: str) -> str:
    try:
        if kind == "ip4":
            return str(ipaddress.IPv4Address(value))
        if kind == "ip6":
            return str(ipaddress.IPv6Address(value))
        if kind == "port":
            if not value.isdigit() or not 0 <= int(value) <= 65535:
                raise ValueError(f"port {value!r} out of range")
            return str(int(value))
        if kind == "peer":
            return PeerId.from_string(value).to_base58()
        if not value or len(value) > 253 or "/" in value:
            raise ValueError(f"invalid {name} value {value!r}")
        return value
    except (ValueError, IdentityError) as exc:
        raise MultiaddrError(f"invalid multiaddr {text!r}: {exc}") from None
