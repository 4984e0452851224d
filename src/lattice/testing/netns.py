"""A NAT testbed made of Linux network namespaces (needs root, iproute2 and nftables).

Topology built by :class:`Testbed`::

    public host "relay" 10.77.0.10 ─┐
    public host ...     10.77.0.11 ─┤   "internet": a namespace holding bridge br0, 10.77.0.0/24
    router "a" 10.77.0.101 ─────────┤
    router "b" 10.77.0.102 ─────────┘
      │ 192.168.1.1/24 (LAN of site "a")        router: nftables masquerade on "wan" (cone or
      └── peer "a1" 192.168.1.2, "a2" .3 ...     symmetric), drops unsolicited inbound, forwards

Every host is a namespace named ``lt-<pid>-<n>-<host>``; interface names live inside the namespaces
(``eth0`` on hosts, ``wan``/``lan`` on routers), so they never clash with the machine's own.

Example::

    with Testbed(public=["relay"], sites=[Site("a", "cone"), Site("b", "symmetric")]) as tb:
        srv = tb.popen("relay", [sys.executable, "-m", "lattice.cli", "run", ...])
        tb.run("a1", ["ping", "-c1", tb.ip("relay")])
        tb.public_ip("a")    # what the internet sees for site "a" (and for its peers)
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal, Self

__all__ = ["PREFIX", "Namespaces", "Site", "Testbed", "cleanup_stale", "netns_unavailable"]

PREFIX = "lt-"
"""Every namespace this module creates is named ``lt-<pid>-<n>-<host>``."""

NatKind = Literal["cone", "symmetric"]
_NETNS_DIR = "/run/netns"
_NAME_RE = re.compile(r"^lt-(\d+)-")
_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_PUBLIC_NET = "10.77.0"
_counter = itertools.count()


@dataclass(frozen=True)
class Site:
    """A NATed site: a router namespace named ``name`` and peer namespaces behind it.

    ``nat``: "cone" is plain ``masquerade`` (Linux keeps the source port when it is free, so the
    mapping is endpoint-independent); "symmetric" is ``masquerade fully-random`` (every connection
    gets a new random external port). ``drop_inbound=False`` leaves out the home-router firewall
    (for experiments only). ``peers`` defaults to one peer named ``<name>1``.
    """

    name: str
    nat: NatKind = "cone"
    peers: tuple[str, ...] | None = None
    drop_inbound: bool = True

    def peer_names(self) -> tuple[str, ...]:
        """The peers behind this site's router."""
        return self.peers if self.peers is not None else (f"{self.name}1",)


class Namespaces(dict[str, str]):
    """Host name -> namespace name, also readable as attributes (``tb.ns.relay``)."""

    def __getattr__(self, host: str) -> str:
        try:
            return self[host]
        except KeyError:
            raise AttributeError(host) from None


def _ip_batch(commands: Iterable[str], netns: str | None = None) -> subprocess.Popen[str]:
    """Start ``ip [-n NS] -batch -`` fed with ``commands``; wait for it with :func:`_wait`."""
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    return _spawn(argv, "\n".join(commands) + "\n")


def _spawn(argv: Sequence[str], stdin: str) -> subprocess.Popen[str]:
    """Start ``argv`` reading ``stdin`` (from a temporary file: no pipe to keep fed)."""
    with tempfile.TemporaryFile("w+") as f:
        f.write(stdin)
        f.seek(0)
        return subprocess.Popen(argv, stdin=f, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def command_line(proc: subprocess.Popen[str]) -> str:
    """The command a process runs, for error messages."""
    args = proc.args
    if isinstance(args, str | bytes | os.PathLike):
        return os.fsdecode(args)
    return " ".join(map(os.fsdecode, args))


def _wait(procs: Iterable[subprocess.Popen[str]], what: str, timeout: float = 20.0) -> None:
    """Wait for setup commands; raise ``RuntimeError`` with their stderr if one failed."""
    errors = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            errors.append(f"{command_line(proc)}: timed out")
            continue
        if proc.returncode != 0:
            errors.append(f"{command_line(proc)}: exit {proc.returncode}: {err.strip()}")
    if errors:
        raise RuntimeError(f"{what} failed: " + "; ".join(errors))


def _veth(name: str, netns: str, peer: str, peer_netns: str) -> str:
    """An ``ip`` batch line creating a veth pair directly inside two namespaces."""
    return f"link add name {name} netns {netns} type veth peer name {peer} netns {peer_netns}"


def _existing() -> list[str]:
    try:
        return sorted(os.listdir(_NETNS_DIR))
    except FileNotFoundError:
        return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(namespaces: Iterable[str]) -> int:
    """SIGKILL every process whose network namespace is one of ``namespaces``; return the count."""
    inodes = set()
    for ns in namespaces:
        with contextlib.suppress(OSError):
            st = os.stat(os.path.join(_NETNS_DIR, ns))
            inodes.add((st.st_dev, st.st_ino))
    if not inodes:
        return 0
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in inodes:
            with contextlib.suppress(OSError):
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
    return killed


def _delete(namespaces: Sequence[str]) -> None:
    """Delete namespaces (best effort, one ``ip -batch`` for all)."""
    if not namespaces:
        return
    cmds = [f"netns del {ns}" for ns in namespaces]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            ["ip", "-force", "-batch", "-"],
            input="\n".join(cmds) + "\n",
            capture_output=True,
            text=True,
            timeout=20,
        )


@functools.cache
def netns_unavailable() -> str | None:
    """None if namespaces with nftables NAT can be made here, else a one-line reason (cached)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (install iproute2 and nftables)"
    trial = f"{PREFIX}{os.getpid()}-probe"
    try:
        r = subprocess.run(["ip", "netns", "add", trial], capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            return f"`ip netns add` failed: {r.stderr.strip() or r.returncode}"
        r = subprocess.run(
            ["ip", "netns", "exec", trial, "nft", "add table ip lt_probe"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if r.returncode != 0:
            return f"nftables unusable in a namespace: {r.stderr.strip() or r.returncode}"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"namespace probe failed: {exc}"
    finally:
        _delete([trial])
    return None


# The kernel's ARP/NDP table is one table for all namespaces, with limits set in the root
# namespace (default gc_thresh3 = 1024 entries): a testbed of 64 hosts on one bridge learns ~4,000
# neighbours and then every namespace on the machine, other testbeds included, fails to resolve
# ("neighbor table overflow!", EHOSTUNREACH, SSDP unanswered).
NEIGHBOUR_TABLE = {"gc_thresh1": 4096, "gc_thresh2": 16384, "gc_thresh3": 32768}


def ensure_neighbour_room() -> None:
    """Raise the shared neighbour-table limits to ``NEIGHBOUR_TABLE`` where they are lower."""
    for family in ("ipv4", "ipv6"):
        for name, want in NEIGHBOUR_TABLE.items():
            path = f"/proc/sys/net/{family}/neigh/default/{name}"
            try:
                with open(path) as f:
                    if int(f.read()) >= want:
                        continue
                with open(path, "w") as f:
                    f.write(str(want))
            except (OSError, ValueError):
                pass  # not root or no such sysctl: small testbeds fit the defaults


def cleanup_stale() -> list[str]:
    """Delete ``lt-<pid>-*`` namespaces left by dead processes (a run killed by SIGKILL).

    Kills any process still living in them first. Returns the names deleted.
    """
    stale = [ns for ns in _existing() if (m := _NAME_RE.match(ns)) and not _pid_alive(int(m.group(1)))]
    if stale:
        _kill_inside(stale)
        _delete(stale)
    return stale


# Testbeds still open in this process: closed by atexit and by the SIGTERM handler.
_open: set[Testbed] = set()
_open_lock = threading.Lock()
_prev_sigterm: Any = None
_sigterm_installed = False


def _close_all() -> None:
    with _open_lock:
        beds = list(_open)
    for bed in beds:
        bed.close()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _close_all()
    prev = _prev_sigterm
    if callable(prev):
        prev(signum, frame)
    elif prev != signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _register(bed: Testbed) -> None:
    global _prev_sigterm, _sigterm_installed
    with _open_lock:
        _open.add(bed)
        if not _sigterm_installed and threading.current_thread() is threading.main_thread():
            with contextlib.suppress(ValueError, OSError):
                _prev_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
                _sigterm_installed = True
                atexit.register(_close_all)


def _unregister(bed: Testbed) -> None:
    with _open_lock:
        _open.discard(bed)


class Testbed:
    """Namespaces forming an "internet" with public hosts and NATed sites (see the module doc).

    Use as a context manager (or call :meth:`close`); everything is torn down on exit, on
    exceptions, at interpreter exit and (best effort) on SIGTERM. Public hosts get 10.77.0.10,
    .11, ...; the router of the i-th site (from 1) gets 10.77.0.(100+i) and 192.168.i.1, its peers
    192.168.i.2, .3, ... Host names must be unique across the testbed.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        public: Sequence[str] = ("relay",),
        sites: Sequence[Site] = (Site("a"), Site("b")),
        *,
        clean_stale: bool = True,
    ) -> None:
        self.public = tuple(public)
        self.sites = {s.name: s for s in sites}
        self.ns = Namespaces()
        self.internet = ""
        self._ips: dict[str, str] = {}
        self._site_of: dict[str, str] = {}
        self._ports: dict[str, str] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._made: list[str] = []
        self._closed = False
        self.setup_seconds = 0.0
        names = [*self.public, *(n for s in sites for n in (s.name, *s.peer_names()))]
        for name in names:
            if not _HOST_RE.match(name) or name == "internet":
                raise ValueError(f"bad host name {name!r}")
        if len(set(names)) != len(names) or len(self.sites) != len(sites):
            raise ValueError(f"host names must be unique: {names}")
        if len(self.public) > 80 or len(sites) > 100 or any(len(s.peer_names()) > 200 for s in sites):
            raise ValueError("too many hosts")
        for site in sites:
            if site.nat not in ("cone", "symmetric"):
                raise ValueError(f"unknown NAT kind {site.nat!r}")
        if clean_stale:
            cleanup_stale()
        _register(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # --- construction -------------------------------------------------------------------------

    def _build(self) -> None:
        start = time.monotonic()
        ensure_neighbour_room()
        tag = f"{PREFIX}{os.getpid()}-{next(_counter)}-"
        self.internet = tag + "internet"
        hosts = [*self.public, *(n for s in self.sites.values() for n in (s.name, *s.peer_names()))]
        self.ns.update({h: tag + h for h in hosts})
        inet = self.internet

        # 1. All namespaces and veth pairs in one batch from the root namespace (links are created
        # directly inside their namespaces, so names only need to be unique per namespace).
        root = [f"netns add {ns}" for ns in (inet, *self.ns.values())]
        root.append(f"link add name br0 netns {inet} type bridge")
        per_ns: dict[str, list[str]] = {ns: ["link set lo up"] for ns in (inet, *self.ns.values())}
        per_ns[inet] += ["link set br0 up"]
        port = 0

        def uplink(host: str, ifname: str, addr: str) -> None:
            nonlocal port
            root.append(_veth(f"p{port}", inet, ifname, self.ns[host]))
            self._ports[host] = f"p{port}"
            per_ns[inet] += [f"link set p{port} master br0", f"link set p{port} up"]
            per_ns[self.ns[host]] += [f"addr add {addr}/24 dev {ifname}", f"link set {ifname} up"]
            port += 1

        for i, host in enumerate(self.public):
            self._ips[host] = f"{_PUBLIC_NET}.{10 + i}"
            uplink(host, "eth0", self._ips[host])
        routers = []
        for i, site in enumerate(self.sites.values(), start=1):
            router = self.ns[site.name]
            routers.append((router, site))
            self._ips[site.name] = f"192.168.{i}.1"
            self._ips[site.name + "@public"] = f"{_PUBLIC_NET}.{100 + i}"
            uplink(site.name, "wan", self._ips[site.name + "@public"])
            for j, peer in enumerate(site.peer_names(), start=2):
                self._ips[peer] = f"192.168.{i}.{j}"
                self._site_of[peer] = site.name
                root.append(_veth(f"lan{j}", router, "eth0", self.ns[peer]))
                per_ns[router] += [f"link set lan{j} master lan", f"link set lan{j} up"]
                per_ns[self.ns[peer]] += [
                    f"addr add {self._ips[peer]}/24 dev eth0",
                    "link set eth0 up",
                    f"route add default via {self._ips[site.name]}",
                ]
            # The router's LAN side is a bridge so a site can have any number of peers.
            root.append(f"link add name lan netns {router} type bridge")
            per_ns[router][1:1] = [f"addr add {self._ips[site.name]}/24 dev lan", "link set lan up"]
        self._made = [inet, *self.ns.values()]
        _wait([_ip_batch(root)], "creating namespaces")

        # 2. Addresses, bridges and routes: one batch per namespace, all in parallel; then the NAT.
        procs = [_ip_batch(cmds, ns) for ns, cmds in per_ns.items()]
        procs += [self._nat(router, site) for router, site in routers]
        _wait(procs, "configuring namespaces")
        self.setup_seconds = time.monotonic() - start

    def _nat(self, router: str, site: Site) -> subprocess.Popen[str]:
        """Turn on forwarding and load the router's nftables ruleset."""
        flags = " fully-random" if site.nat == "symmetric" else ""
        firewall = ""
        if site.drop_inbound:
            firewall = """
table inet lt_filter {
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        ct state established,related accept
        iifname "wan" drop
    }
}
"""
        ruleset = f"""
table ip lt_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade{flags}
    }}
}}
{firewall}"""
        script = "echo 1 > /proc/sys/net/ipv4/ip_forward && exec nft -f -"
        return _spawn(["ip", "netns", "exec", router, "sh", "-c", script], ruleset)

    # --- use ----------------------------------------------------------------------------------

    def _netns(self, host: str) -> str:
        if host in self.ns:
            return self.ns[host]
        if host == "internet" or host == self.internet:
            return self.internet
        if host in self.ns.values():
            return host
        raise KeyError(f"no host {host!r} in this testbed (hosts: {', '.join(self.ns)})")

    def ip(self, host: str) -> str:
        """The address of ``host`` on its network (for a router: its LAN address, the gateway)."""
        if host not in self._ips:
            raise KeyError(f"no host {host!r} in this testbed")
        return self._ips[host]

    def public_ip(self, name: str) -> str:
        """The address the internet sees: a site's router public IP (a peer name gives its site's);
        a public host's own address."""
        site = self._site_of.get(name, name)
        if site in self.sites:
            return self._ips[site + "@public"]
        if name in self.public:
            return self._ips[name]
        raise KeyError(f"no site or host {name!r} in this testbed")

    def port(self, host: str) -> str:
        """The bridge port (an interface in the "internet" namespace) of a public host's or a
        router's uplink: what the internet sends to ``host`` leaves through it."""
        if host not in self._ports:
            raise KeyError(f"{host!r} has no uplink on the internet bridge")
        return self._ports[host]

    def uplink(self, host: str) -> str:
        """The interface, inside ``host``'s namespace, that leads to the internet."""
        self.port(host)
        return "wan" if host in self.sites else "eth0"

    def cut(self, host: str) -> None:
        """Drop everything ``host`` sends or receives on its uplink, silently (no FIN, RST or ICMP):
        a host that vanished with its link. :meth:`heal` undoes it."""
        up = self.uplink(host)
        rules = f"""table inet lt_cut {{
    chain pre {{ type filter hook prerouting priority -300; policy accept; iifname "{up}" drop; }}
    chain post {{ type filter hook postrouting priority 300; policy accept; oifname "{up}" drop; }}
}}"""
        _wait([_spawn(self.exec_argv(host, ["nft", "-f", "-"]), rules)], f"cutting {host}")

    def heal(self, host: str) -> None:
        """Undo :meth:`cut`."""
        self.run(host, ["nft", "delete", "table", "inet", "lt_cut"], check=True)

    def drop_private(self) -> None:
        """Make every router drop, silently, what its peers send to private networks (RFC 1918)
        other than its own LAN and the testbed's internet, as the real internet does: a dial of
        another site's LAN address hangs until its timeout instead of failing at once (ICMP).
        :meth:`private_drops` counts the packets dropped."""
        rules = f"""table ip lt_bogon {{
    chain forward {{
        type filter hook forward priority -10; policy accept;
        oifname "wan" ip daddr != {_PUBLIC_NET}.0/24 ip daddr {{ 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 }} counter drop
    }}
}}"""  # noqa: E501
        routes = [f"route add {net} dev wan" for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]
        procs = [_ip_batch(routes, self.ns[site]) for site in self.sites]  # else: ICMP unreachable
        procs += [_spawn(self.exec_argv(site, ["nft", "-f", "-"]), rules) for site in self.sites]
        _wait(procs, "dropping private destinations")

    def private_drops(self, site: str) -> int:
        """Packets the router of ``site`` dropped since :meth:`drop_private` (sent to another private
        network: a dial that could not reach anything)."""
        out = self.run(site, ["nft", "list", "chain", "ip", "lt_bogon", "forward"], check=True).stdout
        match = re.search(r"counter packets (\d+)", out)
        return int(match.group(1)) if match else 0

    def site_of(self, peer: str) -> str | None:
        """The site a peer is behind, or None for public hosts and routers."""
        return self._site_of.get(peer)

    def exec_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside ``host``'s namespace (``ip netns exec``)."""
        return ["ip", "netns", "exec", self._netns(host), *argv]

    def run(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` inside ``host``'s namespace (default: capture text output, 60 s timeout)."""
        kw.setdefault("capture_output", "stdout" not in kw and "stderr" not in kw)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        return subprocess.run(self.exec_argv(host, argv), **kw)

    def popen(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` inside ``host``'s namespace, in its own session (process group);
        the group is terminated (then killed) on :meth:`close`."""
        if self._closed:
            raise RuntimeError("testbed is closed")
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.exec_argv(host, argv), **kw)
        self._procs.append(proc)
        return proc

    def __getitem__(self, host: str) -> str:
        return self._netns(host)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, grace: float = 1.0) -> None:
        """Stop tracked processes (SIGTERM, then SIGKILL after ``grace`` s), kill anything else
        left in the namespaces and delete them. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            live = [p for p in self._procs if p.poll() is None]
            for proc in live:
                _signal_group(proc, signal.SIGTERM)
            deadline = time.monotonic() + grace
            for proc in live:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
            for proc in live:
                _signal_group(proc, signal.SIGKILL)  # stragglers left in the group
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
            _kill_inside(self._made)
        finally:
            _delete(self._made)
            _unregister(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Testbed {state} internet={self.internet!r} hosts={list(self.ns)}>"


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    with contextlib.suppress(OSError):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except OSError:
                proc.send_signal(sig)
        else:
            os.killpg(proc.pid, sig)  # the leader exited; its group may still hold children
