"""Node configuration: defaults < TOML file < environment (LATTICE_*) < explicit overrides (CLI flags).

Every value is validated when the config is built, so a typo in a file or a malformed multiaddr is a
clear ConfigError at start-up, not a failure later inside the network code.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lattice.errors import ConfigError
from lattice.multiaddr import Multiaddr
from lattice.transport.noise import TRANSPORT_CIPHERS
from lattice.transport.resources import ResourceLimits

if TYPE_CHECKING:
    from lattice.content.config import ContentConfig

__all__ = ["NodeConfig", "default_data_dir", "parse_size"]

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: int | str, name: str = "size") -> int:
    """Bytes from an int or a string such as "512MiB", "2 GiB", "1.5G" (binary units)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"{name} must not be negative")
        return value
    match = _SIZE.fullmatch(str(value))
    if match is None:
        raise ConfigError(f"{name}: {value!r} is not a size (examples: 1073741824, 512MiB, 2GiB)")
    unit = (match.group(2) or "").upper().rstrip("B").rstrip("I")
    return int(float(match.group(1)) * _UNITS[unit])


_LOG_LEVELS = ("debug", "info", "warning", "error")
_UNIX_PATH_MAX = 107
_HOST_PORT = re.compile(r"(\[[0-9a-fA-F:]+\]|[^:\s\[\]]+):\d{1,5}")


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "lattice"


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs to start. Paths left as None derive from ``data_dir``.

    ``listen`` defaults to an OS-chosen port on all interfaces; give a fixed port
    (``/ip4/0.0.0.0/tcp/4001``) to a node other peers should find again after a restart.
    """

    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    bootstrap: tuple[str, ...] = ()  # multiaddrs; /dnsaddr/DOMAIN ones are resolved at start
    dns_servers: tuple[str, ...] = ()  # resolvers for /dnsaddr/ ("IP" or "IP:PORT"; default: the system's)
    data_dir: Path = field(default_factory=default_data_dir)
    key_file: Path | None = None
    control_socket: Path | None = None
    control: bool = True  # serve the local control API (the daemon always does)
    max_connections: int = 512
    # Memory that peers' traffic may hold (receive windows, inbound messages, staged uploads), as
    # bytes or "2GiB"; 0: a quarter of the machine's RAM, at least 256 MiB (docs/operators.md).
    max_memory: int | str = 0
    resources: dict[str, Any] = field(default_factory=dict)  # other ResourceLimits fields ([node.resources])
    keepalive_interval: float = 30.0
    dial_timeout: float = 10.0
    # Yamux receive window of each stream (memory a peer may make us hold per stream, from its
    # budget), and what a busy stream's window may grow to when it, not the link, limits a transfer
    # (one stream moves at most a window per RTT: 4 MiB is 33 MiB/s at 120 ms). docs/operators.md.
    stream_window: int = 4 << 20
    stream_window_max: int = 16 << 20
    # transport ciphers offered to Lattice peers beyond the spec's ChaChaPoly: AES-256-GCM costs a
    # third of it per byte with AES instructions; [] keeps ChaChaPoly everywhere (docs/operators.md)
    noise_ciphers: tuple[str, ...] = TRANSPORT_CIPHERS
    # while a large Yamux data frame arrives, a socket read waits (SO_RCVLOWAT) for up to this many of
    # its bytes (never past the frame's end): fewer wake-ups per MiB on paced links; 0: off
    read_lowat_max: int = 256 << 10
    log_level: str = "info"
    # NAT traversal (lattice.nat.manager)
    relay: bool = False  # serve as a circuit relay for NATed peers
    relays: tuple[str, ...] = ()  # relays to reserve on when private (default: bootstrap peers that relay)
    reachability: str = "auto"  # auto (detect) | public | private
    hole_punching: bool = True
    # AutoNAT servers on distinct IP prefixes (/24, /48) that must reach us at an address before we
    # advertise it as our public one (a lying server cannot make us advertise a third party's address)
    autonat_confirmations: int = 2
    relay_max_reservations: int = 128
    relay_max_circuits: int = 64
    relay_circuit_duration: int = 3600  # seconds
    relay_circuit_bytes: int = 1 << 30  # per direction
    upnp: bool = False  # map the listen port on the LAN gateway (UPnP IGD / NAT-PMP)
    mdns: bool = False  # find peers on the LAN by multicast DNS
    # Swarm (lattice.swarm): roles
    bootstrap_node: bool = False  # public bootstrap node (lattice.swarm.roles sets its limits)
    swarm: str = "default"  # swarm profile to join (lattice.swarm.profiles): built-in or from swarm_file
    swarm_file: Path | None = None  # TOML file of [swarm.NAME] profiles
    # DHT store quotas (lattice.dht.store.StoreLimits): record bytes a node keeps for others
    dht_max_bytes: int = 256 << 20  # whole store (RAM, and about as much in dht.sqlite)
    dht_max_bytes_per_publisher: int = 4 << 20  # one signer's records
    dht_max_bytes_per_prefix: int = 16 << 20  # records PUT by peers of one /24 or /48 (not exempt IPs)
    # DHT on wide-area links (lattice.dht.DHTConfig): a put returns once this many of the k closest
    # stored the record (0: all k; the rest finish in the background); table contacts kept connected
    dht_store_quorum: int = 10
    dht_warm_connections: int = 64
    # RPC limits (lattice.rpc.RPCConfig): what peers' calls may make this node hold
    rpc_max_payload: int | str = 16 << 20  # a method's largest message unless it sets its own ("16MiB")
    rpc_max_inbound_per_peer: int = 64  # calls of one peer in progress here (node-wide: 2048)
    rpc_message_idle_timeout: float = 30.0  # an inbound message stalled this long is reset
    rpc_upload_peer_bytes: int | str = 2 << 30  # resumable-upload staging one peer may hold
    # Content store (lattice.content): disk for added and fetched content ("64GiB" works too); room is
    # made by dropping unpinned content, least recently used first
    content_max_bytes: int | str = 32 << 30
    content: dict[str, Any] = field(default_factory=dict)  # other ContentConfig fields ([node.content])
    # Observability (lattice.observe)
    metrics_listen: str | None = None  # HOST:PORT of /metrics, /api/state and the web page (off if None)
    log_format: str = "text"  # text | json (one JSON object per line)
    # Tensor inbox (`lattice-node run --inbox`, lattice.rpc.inbox): what peers may store on our disk
    inbox_max_files: int = 1024  # .npy files in the inbox, from all peers
    inbox_max_bytes: int = 16 << 30  # bytes in the inbox, from all peers
    inbox_max_files_per_peer: int = 128  # so that one peer cannot take the whole inbox
    inbox_max_bytes_per_peer: int = 4 << 30
    # Installed apps whose services run inside this node (lattice.plugins; `run --app NAME`)
    apps: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_memory", parse_size(self.max_memory, "max_memory"))
        for name in ("rpc_max_payload", "rpc_upload_peer_bytes"):
            object.__setattr__(self, name, parse_size(getattr(self, name), name))
        if not isinstance(self.resources, dict):
            raise ConfigError("resources must be a table of resource limits")
        known = {f.name for f in fields(ResourceLimits)} - {"max_memory", "max_connections"}
        unknown = set(self.resources) - known
        if unknown:
            raise ConfigError(
                f"unknown resources keys: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})"
            )
        for name in ("listen", "bootstrap", "relays"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, list | tuple):
                raise ConfigError(f"{name} must be a list of multiaddrs")
            object.__setattr__(self, name, tuple(str(Multiaddr.parse(a)) for a in value))
        for addr in self.listen:
            ma = Multiaddr.parse(addr)
            if ma.tcp_target() is None or ma.parts[0][0] not in ("ip4", "ip6") or ma.peer_id is not None:
                raise ConfigError(f"cannot listen on {addr}: expected /ip4|ip6/ADDRESS/tcp/PORT")
        for addr in self.bootstrap:
            ma = Multiaddr.parse(addr)
            if ma.tcp_target() is None and ma.parts[0][0] != "dnsaddr":
                raise ConfigError(
                    f"bootstrap address {addr} is not /ip4|ip6|dns/.../tcp/PORT nor /dnsaddr/DOMAIN"
                )
        if isinstance(self.dns_servers, str) or not isinstance(self.dns_servers, list | tuple):
            raise ConfigError("dns_servers must be a list of IP or IP:PORT")
        object.__setattr__(self, "dns_servers", tuple(str(s) for s in self.dns_servers))
        if not isinstance(self.swarm, str) or not self.swarm:
            raise ConfigError("swarm must be the name of a swarm profile")
        for name in ("data_dir", "key_file", "control_socket", "swarm_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                if not isinstance(value, str) or not value:
                    raise ConfigError(f"{name} must be a path")
                value = Path(os.path.expanduser(value))
            if value is not None:  # absolute: the daemon's paths are shared with other processes
                object.__setattr__(self, name, Path(os.path.abspath(value)))
        if self.control_path is not None and len(os.fsencode(str(self.control_path))) > _UNIX_PATH_MAX:
            raise ConfigError(
                f"control socket path {self.control_path} is longer than {_UNIX_PATH_MAX} bytes; "
                "choose a shorter one"
            )
        if not isinstance(self.max_connections, int) or self.max_connections < 1:
            raise ConfigError("max_connections must be a positive integer")
        _ = self.resource_limits  # validates every budget now (ResourceLimits raises ConfigError)
        object.__setattr__(self, "content_max_bytes", parse_size(self.content_max_bytes, "content_max_bytes"))
        _ = self.content_config  # validates the [node.content] table now
        for name in ("keepalive_interval", "dial_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds")
        for addr in self.relays:
            ma = Multiaddr.parse(addr)
            if ma.tcp_target() is None or ma.peer_id is None:
                raise ConfigError(f"relay address {addr} must be /ip4|ip6|dns/.../tcp/PORT/p2p/PEER")
        if self.reachability not in ("auto", "public", "private"):
            raise ConfigError("reachability must be one of auto, public, private")
        for name in (
            "relay_max_reservations",
            "relay_max_circuits",
            "relay_circuit_duration",
            "autonat_confirmations",
        ):
            self._positive_int(name)
        self._positive_int("relay_circuit_bytes")
        self._positive_int("stream_window")
        self._positive_int("stream_window_max")
        lowat = self.read_lowat_max
        if not isinstance(lowat, int) or isinstance(lowat, bool) or lowat < 0:
            raise ConfigError("read_lowat_max must be a non-negative integer")
        if self.stream_window_max < self.stream_window:
            raise ConfigError("stream_window_max must be at least stream_window")
        if isinstance(self.noise_ciphers, str) or not isinstance(self.noise_ciphers, list | tuple):
            raise ConfigError(f"noise_ciphers must be a list of {', '.join(TRANSPORT_CIPHERS)}")
        for name in self.noise_ciphers:
            if name not in TRANSPORT_CIPHERS:
                raise ConfigError(f"unknown noise cipher {name!r} (known: {', '.join(TRANSPORT_CIPHERS)})")
        object.__setattr__(self, "noise_ciphers", tuple(self.noise_ciphers))
        for name in (
            "inbox_max_files",
            "inbox_max_bytes",
            "inbox_max_files_per_peer",
            "inbox_max_bytes_per_peer",
            "dht_max_bytes",
            "dht_max_bytes_per_publisher",
            "dht_max_bytes_per_prefix",
            "rpc_max_payload",
            "rpc_max_inbound_per_peer",
            "rpc_upload_peer_bytes",
        ):
            self._positive_int(name)
        for name in ("dht_store_quorum", "dht_warm_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0")
        timeout = self.rpc_message_idle_timeout
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not timeout > 0:
            raise ConfigError("rpc_message_idle_timeout must be a positive number of seconds")
        for name in ("relay", "hole_punching", "upnp", "mdns", "control", "bootstrap_node"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false")
        listen = self.metrics_listen
        if listen is not None and not (isinstance(listen, str) and _HOST_PORT.fullmatch(listen)):
            raise ConfigError(f"metrics_listen {listen!r} must be HOST:PORT, e.g. 127.0.0.1:9090")
        if self.log_format not in ("text", "json"):
            raise ConfigError("log_format must be text or json")
        if self.log_level not in _LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(_LOG_LEVELS)}")
        object.__setattr__(self, "apps", _app_names(self.apps))

    @property
    def resource_limits(self) -> ResourceLimits:
        """The transport's budgets: ``resources`` with ``max_memory`` and ``max_connections``."""
        return ResourceLimits(
            **{**self.resources, "max_memory": self.max_memory, "max_connections": self.max_connections}
        )

    @property
    def content_config(self) -> ContentConfig:
        """The content service's limits: ``content`` with ``content_max_bytes``."""
        from lattice.content.config import ContentConfig

        return ContentConfig.from_table(self.content, max_bytes=parse_size(self.content_max_bytes))

    def _positive_int(self, name: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer")

    @property
    def key_path(self) -> Path:
        return self.key_file if self.key_file is not None else self.data_dir / "identity.key"

    @property
    def control_path(self) -> Path | None:
        if not self.control:
            return None
        return self.control_socket if self.control_socket is not None else self.data_dir / "control.sock"

    def with_overrides(self, **overrides: Any) -> NodeConfig:
        """A copy with the given fields replaced (None values are ignored)."""
        values = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(values) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return replace(self, **values)

    @classmethod
    def load(
        cls,
        file: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        defaults: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> NodeConfig:
        """Build the config from defaults (``defaults``: a command's own, over the built-in ones), then
        ``file`` (or $LATTICE_CONFIG), the environment, overrides."""
        env = dict(os.environ) if env is None else env
        values: dict[str, Any] = dict(defaults or {})
        file = file or env.get("LATTICE_CONFIG")
        if file:
            values.update(_read_toml(Path(file)))
        values.update(_from_env(env))
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"invalid configuration: {exc}") from None


_ENV_LISTS = {
    "LATTICE_LISTEN": "listen",
    "LATTICE_BOOTSTRAP": "bootstrap",
    "LATTICE_RELAYS": "relays",
    "LATTICE_APPS": "apps",
}
_APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _app_names(value: Any) -> tuple[str, ...]:
    """``apps`` as a tuple of entry-point names (checked here, looked up when the node is built)."""
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ConfigError("apps must be a list of app names")
    for name in value:
        if not isinstance(name, str) or not _APP_NAME.fullmatch(name):
            raise ConfigError(f"apps: {name!r} is not an app name (letters, digits, _ . -)")
    return tuple(dict.fromkeys(value))


_ENV_SCALARS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "LATTICE_DATA_DIR": ("data_dir", str),
    "LATTICE_KEY_FILE": ("key_file", str),
    "LATTICE_CONTROL_SOCKET": ("control_socket", str),
    "LATTICE_MAX_CONNECTIONS": ("max_connections", int),
    "LATTICE_MAX_MEMORY": ("max_memory", str),
    "LATTICE_KEEPALIVE_INTERVAL": ("keepalive_interval", float),
    "LATTICE_DIAL_TIMEOUT": ("dial_timeout", float),
    "LATTICE_LOG_LEVEL": ("log_level", str),
    "LATTICE_REACHABILITY": ("reachability", str),
    "LATTICE_RELAY": ("relay", lambda v: _bool(v, "LATTICE_RELAY")),
    "LATTICE_SWARM": ("swarm", str),
    "LATTICE_SWARM_FILE": ("swarm_file", str),
    "LATTICE_METRICS_LISTEN": ("metrics_listen", str),
    "LATTICE_LOG_FORMAT": ("log_format", str),
}


def _bool(value: str, var: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(var)


def _from_env(env: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for var, name in _ENV_LISTS.items():
        if env.get(var):
            values[name] = [a.strip() for a in env[var].split(",") if a.strip()]
    for var, (name, kind) in _ENV_SCALARS.items():
        if env.get(var):
            try:
                values[name] = kind(env[var])
            except ValueError:
                kind_name = getattr(kind, "__name__", "value") if kind in (int, float, str) else "boolean"
                raise ConfigError(f"{var}={env[var]!r} is not a valid {kind_name}") from None
    return values


def load_toml(path: Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file as a dict; a missing, unreadable or malformed file is a one-line ConfigError."""
    try:
        with Path(path).open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    data = load_toml(path)
    node = data.get("node", data)  # keys may sit at top level or under [node]
    if not isinstance(node, dict):
        raise ConfigError(f"config file {path}: [node] must be a table")
    return {k.replace("-", "_"): v for k, v in node.items()}
