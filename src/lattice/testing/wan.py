"""A wide-area testbed: hosts in their own network namespaces, each behind a shaped access link.

Every host is a public host of a :class:`~lattice.testing.netns.Testbed` (one namespace each, on
the bridge "internet"); its :class:`Link` has an uplink and a downlink rate (``tbf`` on each end
of the host's veth: the host's egress and the bridge port's egress), a one-way delay, jitter and
loss. A packet from A to B is delayed by ``A.delay_ms + B.delay_ms`` (jitter adds the same way)
and lost with ``1 - (1 - A.loss) * (1 - B.loss)``; it crosses A's uplink and B's downlink rate.
So between two hosts of one :class:`Preset` the round-trip time, rate and loss are the preset's.

Latency, jitter and loss are applied by one helper process on the receiving side (see
``lattice.testing._delayline``: this kernel has no ``netem``), rates by ``tbf``. Needs root,
iproute2 (``ip``, ``tc``) and iptables (NFQUEUE). Example::

    with WanTestbed(["a", "b"], "continental") as tb:
        print(tb.probe("a", "b"))   # measured RTT and TCP goodput next to the preset's
        tb.popen("b", [sys.executable, "-m", "lattice.cli", "run", ...])
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lattice.testing.netns import Testbed, command_line, netns_unavailable

__all__ = ["PRESETS", "Link", "Preset", "WanTestbed", "mixed_links", "wan_unavailable"]


@dataclass(frozen=True)
class Link:
    """One host's access link. Delay, jitter and loss are what this link adds to every packet
    crossing it, in each direction (a path adds both ends' values)."""

    delay_ms: float = 0.0
    up_mbit: float = 1000.0
    down_mbit: float = 1000.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    label: str = ""

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0 or self.jitter_ms > self.delay_ms + 1e-9:
            raise ValueError(f"need 0 <= jitter_ms <= delay_ms: {self}")
        if not 0 <= self.loss < 1 or min(self.up_mbit, self.down_mbit) <= 0:
            raise ValueError(f"bad loss or rate: {self}")


@dataclass(frozen=True)
class Preset:
    """A homogeneous network: any two hosts see ``rtt_ms`` round trip (not one way), ``rate_mbit``
    each way, ``loss`` per packet and direction, ``jitter_ms`` on the one-way delay."""

    name: str
    rtt_ms: float
    rate_mbit: float
    loss: float = 0.0
    jitter_ms: float = 0.0

    def link(self) -> Link:
        """The link each host gets: a quarter of the RTT per end and direction, half the jitter,
        and the loss that two links in a row compound to ``loss``."""
        return Link(
            delay_ms=self.rtt_ms / 4,
            up_mbit=self.rate_mbit,
            down_mbit=self.rate_mbit,
            jitter_ms=self.jitter_ms / 2,
            loss=1 - math.sqrt(1 - self.loss),
            label=self.name,
        )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("lan", rtt_ms=0.2, rate_mbit=1000),
        Preset("metro", rtt_ms=10, rate_mbit=500, jitter_ms=0.5),
        Preset("continental", rtt_ms=40, rate_mbit=200, loss=0.001, jitter_ms=1),
        Preset("intercontinental", rtt_ms=120, rate_mbit=50, loss=0.005, jitter_ms=2),
    )
}
"""The named presets. ``mixed`` (see :func:`mixed_links`) is the heterogeneous one."""

MIXED_KINDS = (
    Link(delay_ms=5, up_mbit=1000, down_mbit=1000, label="cloud"),
    Link(delay_ms=8, up_mbit=500, down_mbit=500, jitter_ms=0.5, label="lab"),
    Link(delay_ms=10, up_mbit=100, down_mbit=500, jitter_ms=1, loss=0.0005, label="home-fibre"),
    Link(delay_ms=15, up_mbit=20, down_mbit=100, jitter_ms=2, loss=0.001, label="home-cable"),
)
"""The access links of the ``mixed`` preset, given to hosts in turn (cloud to home-cable: 40 ms RTT)."""


def mixed_links(hosts: Sequence[str]) -> dict[str, Link]:
    """Links for the heterogeneous ``mixed`` preset: ``MIXED_KINDS`` in turn."""
    return {h: MIXED_KINDS[i % len(MIXED_KINDS)] for i, h in enumerate(hosts)}


def links_for(hosts: Sequence[str], preset: str | Preset) -> dict[str, Link]:
    """Each host's link under a named preset, a :class:`Preset`, or ``"mixed"``."""
    if preset == "mixed":
        return mixed_links(hosts)
    p = PRESETS[preset] if isinstance(preset, str) else preset
    return dict.fromkeys(hosts, p.link())


def wan_unavailable() -> str | None:
    """None if a :class:`WanTestbed` can be built here, else a one-line reason."""
    if reason := netns_unavailable():
        return reason
    for tool in ("tc", "iptables-restore"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (install iproute2 and iptables)"
    return None


def _tbf(mbit: float, delay_ms: float) -> str:
    """``tbf`` arguments for a link: a burst that keeps GSO packets whole (so the delay line sees
    few, large packets), and a buffer of one RTT at the link's rate plus 20 ms (at least 128 KiB)."""
    rate = mbit * 1e6 / 8
    burst = max(int(rate / 1000), 70_000)
    limit = max(int(rate * (4 * delay_ms + 20) / 1000), 128 * 1024) + burst
    return f"tbf rate {mbit:g}mbit burst {burst} limit {limit}"


def _spawn(argv: Sequence[str], stdin: str) -> subprocess.Popen[str]:
    """Start a setup command fed with ``stdin``; :func:`_wait` collects it."""
    with tempfile.TemporaryFile("w+") as f:
        f.write(stdin)
        f.seek(0)
        return subprocess.Popen(argv, stdin=f, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(procs: Sequence[subprocess.Popen[str]], what: str) -> None:
    """Wait for setup commands; ``RuntimeError`` with the stderr of those that failed."""
    errors = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0:
            errors.append(f"{command_line(proc)}: {err.strip()}")
    if errors:
        raise RuntimeError(f"{what} failed: " + "; ".join(errors))


class WanTestbed(Testbed):
    """Public hosts on shaped links (see the module doc); a :class:`Testbed` otherwise.

    ``preset``: a name from :data:`PRESETS`, ``"mixed"`` or a :class:`Preset`; ``links`` overrides
    it per host. ``sysctls`` are set in every host's namespace (e.g. a tuned host's
    ``net.ipv4.tcp_wmem``). ``probe(a, b)`` measures what a path really gives."""

    def __init__(
        self,
        hosts: Sequence[str] | int = ("a", "b"),
        preset: str | Preset = "continental",
        links: Mapping[str, Link] | None = None,
        *,
        sysctls: Mapping[str, str] | None = None,
        clean_stale: bool = True,
    ) -> None:
        names = [f"h{i}" for i in range(hosts)] if isinstance(hosts, int) else list(hosts)
        self.links = {**links_for(names, preset), **(links or {})}
        self.preset = preset if isinstance(preset, str) else preset.name
        self.sysctls = dict(sysctls or {})
        self._delayline: subprocess.Popen[str] | None = None
        super().__init__(public=names, sites=(), clean_stale=clean_stale)
        try:
            self._shape()
        except BaseException:
            self.close()
            raise

    def _shape(self) -> None:
        procs = []
        inet_cmds = []
        for host, link in self.links.items():
            dev = self.uplink(host)
            up = f"qdisc replace dev {dev} root {_tbf(link.up_mbit, link.delay_ms)}\n"
            procs.append(_spawn(["tc", "-n", self[host], "-batch", "-"], up))
            inet_cmds.append(
                f"qdisc replace dev {self.port(host)} root {_tbf(link.down_mbit, link.delay_ms)}"
            )
        procs.append(_spawn(["tc", "-n", self.internet, "-batch", "-"], "\n".join(inet_cmds) + "\n"))
        queues = [q for host in self.links if (q := self._queue(host)) is not None]
        for q in queues:
            host = q["host"]
            rules = f"*mangle\n-A PREROUTING -i {self.uplink(host)} -j NFQUEUE --queue-num 0\nCOMMIT\n"
            procs.append(_spawn(self.exec_argv(host, ["iptables-restore"]), rules))
        if self.sysctls:
            settings = [f"{key}={value}" for key, value in self.sysctls.items()]
            for host in self.links:
                procs.append(_spawn(self.exec_argv(host, ["sysctl", "-q", "-w", *settings]), ""))
        _wait(procs, "shaping links")
        if queues:
            self._start_delayline(queues)

    def _queue(self, host: str) -> dict[str, Any] | None:
        """The delay line's queue for packets arriving at ``host`` (None: nothing to add)."""
        me = self.links[host]
        delay, loss, jitter = {}, {}, {}
        for other, link in self.links.items():
            if other != host:
                ip = self.ip(other)
                delay[ip] = me.delay_ms + link.delay_ms
                loss[ip] = 1 - (1 - me.loss) * (1 - link.loss)
                jitter[ip] = me.jitter_ms + link.jitter_ms
        if not any(delay.values()) and not any(loss.values()) and not me.delay_ms and not me.loss:
            return None
        return {
            "host": host,
            "netns": f"/run/netns/{self[host]}",
            "delay_ms": delay,
            "loss": loss,
            "jitter_ms": jitter,
            "default_delay_ms": me.delay_ms,
            "default_loss": me.loss,
            "default_jitter_ms": me.jitter_ms,
        }

    def _start_delayline(self, queues: list[dict[str, Any]]) -> None:
        spec = [{k: v for k, v in q.items() if k != "host"} for q in queues]
        proc = subprocess.Popen(
            [sys.executable, "-m", "lattice.testing._delayline"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._delayline = proc
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(spec) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if line.strip() != "ready":
            proc.kill()
            raise RuntimeError(f"delay line failed: {line}{proc.stderr.read() if proc.stderr else ''}")

    def delayline_pid(self) -> int | None:
        """The process id of the delay line (None when no link needs one)."""
        return self._delayline.pid if self._delayline is not None else None

    def rtt_ms(self, a: str, b: str) -> float:
        """The round-trip time the links promise between ``a`` and ``b``."""
        return 2 * (self.links[a].delay_ms + self.links[b].delay_ms)

    def rate_mbit(self, a: str, b: str) -> float:
        """The rate the links promise from ``a`` to ``b``."""
        return min(self.links[a].up_mbit, self.links[b].down_mbit)

    def probe(self, a: str, b: str, megabytes: int = 16, pings: int = 20) -> dict[str, Any]:
        """Measure the path from ``a`` to ``b``: TCP connect and 8-byte echo round trips (median ms)
        and the goodput of one plain TCP transfer of ``megabytes`` MB from a to b, beside what the
        links promise. Runs a small server in ``b`` for the duration of the call."""
        server = self.popen(b, [sys.executable, "-c", _PROBE_SERVER], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            r = self.run(a, [sys.executable, "-c", _PROBE_CLIENT, self.ip(b), str(port), str(megabytes),
                             str(pings)], timeout=120)  # fmt: skip
            if r.returncode != 0:
                raise RuntimeError(f"probe {a}->{b} failed: {r.stderr.strip()[-500:]}")
            measured = json.loads(r.stdout)
        finally:
            with contextlib.suppress(OSError):
                server.kill()
            server.wait()
        rate = self.rate_mbit(a, b)
        return {
            "from": a,
            "to": b,
            "rtt_ms": self.rtt_ms(a, b),
            "rate_mbit": rate,
            "loss": round(1 - (1 - self.links[a].loss) * (1 - self.links[b].loss), 6),
            **measured,
            "goodput_fraction": round(measured["goodput_mbit"] / rate, 3),
        }

    def describe(self) -> dict[str, Any]:
        """The links as plain data (for a bench's JSON lines)."""
        return {"preset": self.preset, "links": {h: asdict(link) for h, link in self.links.items()}}

    def close(self, grace: float = 1.0) -> None:
        proc, self._delayline = self._delayline, None
        if proc is not None:
            with contextlib.suppress(OSError):
                if proc.stdin:
                    proc.stdin.close()
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        super().close(grace)


# Prints its port, then serves one connection: echo 8-byte pings until a 0-length marker, then
# sink everything and answer the byte count when the client half-closes.
_PROBE_SERVER = r"""
import socket, sys
srv = socket.create_server(("0.0.0.0", 0)); print(srv.getsockname()[1], flush=True)
while True:
    c, _ = srv.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    mode = c.recv(1)
    if mode == b"e":
        while (b := c.recv(64)):
            c.sendall(b)
    else:
        buf = bytearray(1 << 20); n = 0
        while (k := c.recv_into(buf)):
            n += k
        c.sendall(str(n).encode())
    c.close()
"""

_PROBE_CLIENT = r"""
import json, socket, statistics, sys, time
host, port, mb, pings = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter(); c = socket.create_connection((host, port)); connect = time.perf_counter() - t0
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); c.sendall(b"e")
echo = []
for _ in range(pings):
    t0 = time.perf_counter(); c.sendall(b"12345678"); got = b""
    while len(got) < 8:
        got += c.recv(64)
    echo.append(time.perf_counter() - t0)
c.close()
data = bytes(1 << 20)
c = socket.create_connection((host, port)); c.sendall(b"s")
t0 = time.perf_counter()
for _ in range(mb):
    c.sendall(data)
c.shutdown(socket.SHUT_WR); n = int(c.recv(64)); elapsed = time.perf_counter() - t0
assert n == mb << 20, n
ms = lambda t: round(t * 1000, 3)
print(json.dumps({"connect_ms": ms(connect), "echo_ms": ms(statistics.median(echo)),
                  "echo_max_ms": ms(max(echo)),
                  "goodput_mbit": round(n * 8 / elapsed / 1e6, 1)}))
"""


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lattice.testing.wan [PRESET ...]``: build two hosts per preset and print, as JSON
    lines, the measured RTT and TCP goodput next to what the preset promises."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("presets", nargs="*", default=[*PRESETS, "mixed"])
    parser.add_argument("--megabytes", type=int, default=32)
    args = parser.parse_args(argv)
    if reason := wan_unavailable():
        raise SystemExit(f"cannot build a WAN testbed here: {reason}")
    for preset in args.presets:
        hosts = ["cloud", "lab", "fibre", "cable"] if preset == "mixed" else ["a", "b"]
        with WanTestbed(hosts, preset) as tb:
            pairs = (
                [("cable", "cloud"), ("cloud", "cable"), ("lab", "fibre")]
                if preset == "mixed"
                else [("a", "b")]
            )
            for a, b in pairs:
                print(json.dumps({"preset": preset, **tb.probe(a, b, args.megabytes)}), flush=True)


if __name__ == "__main__":
    main()
