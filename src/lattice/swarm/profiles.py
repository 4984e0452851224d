"""Swarm profiles: which network a node joins, and the protocol ids that keep networks apart.

A profile names a swarm id, its bootstrap peers, the Kademlia protocol id, the identify
``protocol_version`` and the limits of its public nodes. Two swarms use different DHT protocol ids
(a request of the other swarm fails negotiation) and different identify versions (a peer whose
version names another swarm is never added to the routing table). go/rust/py libp2p peers connect,
identify and ping a node of any profile; their Kademlia speaks ``/ipfs/kad/1.0.0``, which only the
``libp2p`` profile serves (the ``default`` one speaks ``/lattice/kad/1.0.0``). The ``lattica``
profile speaks with Lattica nodes (its identify version and Kademlia id are both ``/lattica/1.0.0``).

Built-in profiles live in :data:`BUILTIN`; more come from TOML files (``--swarm-file``)::

    [swarm.mynet]
    bootstrap = ["/dns4/boot1.example.org/tcp/4001/p2p/12D3KooW..."]
    # optional: id (default: the name), kad_protocol, identify_version, sink_protocols
    [swarm.mynet.limits]
    max_conns_per_ip = 8
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lattice.config import load_toml
from lattice.errors import ConfigError
from lattice.multiaddr import Multiaddr
from lattice.transport.limits import Limits

__all__ = ["BUILTIN", "DEFAULT", "SwarmLimits", "SwarmProfile", "load_profiles", "resolve", "swarm_of"]

_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
DEFAULT_KAD = "/lattice/kad/1.0.0"
DEFAULT_IDENTIFY = "lattice/1.0.0"
# where the public test swarm's operators publish its bootstrap list (docs/operators.md)
PUBLIC_TEST_DNSADDR = "/dnsaddr/public-test.lattice-p2p.org"
# identify versions of other implementations that name a swarm of their own: prefix -> swarm id
FOREIGN_SWARMS = {"/lattica/": "lattica"}  # Lattica (rust-libp2p) drops a peer that is not "/lattica/1.0.0"


SwarmLimits = Limits  # what one peer may cost a node (enforced by lattice.transport.limits)


@dataclass(frozen=True)
class SwarmProfile:
    name: str
    swarm_id: str
    bootstrap: tuple[str, ...] = ()
    kad_protocol: str = ""
    identify_version: str = ""
    limits: SwarmLimits = field(default_factory=SwarmLimits)
    # protocols accepted and read to nothing (lattice.transport.sink): this swarm's peers reopen
    # them in a loop when refused (Lattica's bitswap), which our stream rate limit would punish
    sink_protocols: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _ID.fullmatch(self.swarm_id):
            raise ConfigError(f"swarm id {self.swarm_id!r} must be 1-63 of a-z 0-9 - (lowercase)")
        default = self.swarm_id == "default"
        if not self.kad_protocol:
            kad = DEFAULT_KAD if default else f"/lattice/{self.swarm_id}/kad/1.0.0"
            object.__setattr__(self, "kad_protocol", kad)
        if not self.identify_version:
            version = DEFAULT_IDENTIFY if default else f"lattice/{self.swarm_id}/1"
            object.__setattr__(self, "identify_version", version)
        if not self.kad_protocol.startswith("/"):
            raise ConfigError(f"kad_protocol of swarm {self.name!r} must start with /")
        if swarm_of(self.identify_version) != self.swarm_id:
            raise ConfigError(
                f"identify_version {self.identify_version!r} of swarm {self.name!r} must read "
                f"lattice/{self.swarm_id}/VERSION"
                + (f" (or {self.swarm_id}'s own version)" if self.swarm_id in FOREIGN_SWARMS.values() else "")
            )
        for addr in self.bootstrap:
            ma = Multiaddr.parse(addr)
            if ma.parts[0][0] == "dnsaddr":  # resolved at start (lattice.transport.dnsaddr)
                continue
            if ma.tcp_target() is None or ma.peer_id is None:
                raise ConfigError(
                    f"bootstrap address {addr} of swarm {self.name!r} needs /tcp/PORT/p2p/PEER or /dnsaddr/"
                )


def swarm_of(protocol_version: str) -> str | None:
    """The swarm id a peer's identify ``protocol_version`` names: ``lattice/<id>/<v>`` -> id,
    ``lattice/<v>`` (digits) -> "default", ``/lattica/<v>`` -> "lattica" (FOREIGN_SWARMS); None for
    other implementations (go, rust, py: their Kademlia protocol id decides whether they are in ours)."""
    for prefix, swarm in FOREIGN_SWARMS.items():
        if protocol_version.startswith(prefix):
            return swarm
    parts = protocol_version.split("/")
    if len(parts) < 2 or parts[0] != "lattice":
        return None
    if parts[1][:1].isdigit():
        return "default"
    return parts[1] if _ID.fullmatch(parts[1]) else None


DEFAULT = SwarmProfile("default", "default")
BUILTIN: dict[str, SwarmProfile] = {
    "default": DEFAULT,
    # The public test swarm: its operators publish the bootstrap list in DNS (TXT records under
    # _dnsaddr.<domain>, docs/operators.md), so it changes without a release
    "public-test": SwarmProfile("public-test", "public-test", bootstrap=(PUBLIC_TEST_DNSADDR,)),
    # Kademlia under the libp2p id go/rust/py libp2p peers use by default (no bootstrap list: it is
    # not the IPFS network, it lets libp2p peers of your own query and be queried; docs/interop.md)
    "libp2p": SwarmProfile("libp2p", "libp2p", kad_protocol="/ipfs/kad/1.0.0"),
    # Lattica's swarm (rust-libp2p): Kademlia under its id, its identify version (docs/interop.md)
    "lattica": SwarmProfile(
        "lattica",
        "lattica",
        kad_protocol="/lattica/1.0.0",
        identify_version="/lattica/1.0.0",
        sink_protocols=("/ipfs/bitswap/1.2.0",),
    ),
}


def load_profiles(path: Path) -> dict[str, SwarmProfile]:
    """Profiles from a TOML file (``[swarm.NAME]`` tables)."""
    data = load_toml(path, "swarm file")
    tables = data.get("swarm")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"swarm file {path} has no [swarm.NAME] table")
    out = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"swarm file {path}: [swarm.{name}] must be a table")
        out[name] = _profile(name, table, path)
    return out


def _profile(name: str, table: dict[str, Any], path: Path) -> SwarmProfile:
    known = {"id", "bootstrap", "kad_protocol", "identify_version", "limits", "sink_protocols"}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"swarm file {path}: unknown keys in [swarm.{name}]: {', '.join(sorted(unknown))}")
    limits = table.get("limits", {})
    if not isinstance(limits, dict):
        raise ConfigError(f"swarm file {path}: [swarm.{name}.limits] must be a table")
    limit_names = {f.name for f in fields(SwarmLimits)}
    bad = set(limits) - limit_names
    if bad:
        raise ConfigError(f"swarm file {path}: unknown limits {', '.join(sorted(bad))}")
    bootstrap = table.get("bootstrap", [])
    if not isinstance(bootstrap, list) or not all(isinstance(a, str) for a in bootstrap):
        raise ConfigError(f"swarm file {path}: bootstrap of {name!r} must be a list of multiaddrs")
    sinks = table.get("sink_protocols", [])
    if not isinstance(sinks, list) or not all(isinstance(p, str) and p.startswith("/") for p in sinks):
        raise ConfigError(f"swarm file {path}: sink_protocols of {name!r} must be a list of protocol ids")
    return SwarmProfile(
        name=name,
        swarm_id=str(table.get("id", name)),
        bootstrap=tuple(bootstrap),
        kad_protocol=str(table.get("kad_protocol", "")),
        identify_version=str(table.get("identify_version", "")),
        limits=_limits(limits, path),
        sink_protocols=tuple(sinks),
    )


def resolve(name: str, swarm_file: Path | None = None) -> SwarmProfile:
    """The profile called ``name``: from ``swarm_file`` first, then the built-ins."""
    profiles = dict(BUILTIN)
    if swarm_file is not None:
        profiles.update(load_profiles(swarm_file))
    if name in profiles:
        return profiles[name]
    known = ", ".join(sorted(profiles))
    raise ConfigError(f"unknown swarm {name!r} (known: {known}; define it in a --swarm-file)")


def with_limits(profile: SwarmProfile, **limits: Any) -> SwarmProfile:
    """A copy of ``profile`` with some limits changed (tests, embedded nodes)."""
    return replace(profile, limits=replace(profile.limits, **limits))


def _limits(values: dict[str, Any], path: Path) -> Limits:
    try:
        return Limits(**values)
    except TypeError as exc:
        raise ConfigError(f"swarm file {path}: invalid limits: {exc}") from None
