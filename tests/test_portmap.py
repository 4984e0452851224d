"""Port mapping against real (fake) routers: NAT-PMP and UPnP IGD responders over real sockets.

A "router" namespace and a "client" namespace are joined by a veth pair; the client's default route
points at the router, so gateway detection, SSDP multicast, HTTP and SOAP all run as on a LAN and
nothing leaves this machine. The router process (``python tests/test_portmap.py router``) runs, on
separate ports, a well-behaved NAT-PMP server and IGD and several hostile ones; each test runs one
client scenario (``python tests/test_portmap.py client NAME``) in the client namespace and checks
the JSON it prints. Needs root and iproute2; skipped with the reason otherwise. The last tests run
Debian's miniupnpd (if installed) as a real IGD and dial the mapped port from a third namespace.

Router ports: NAT-PMP 5351 good, 5352 refuses (result 2), 5353 garbage, 5354 silent, 5355 changes
the external port on every renewal, 5359 closed. SSDP 1900 good IGD, 1901 endless description,
1902 DOCTYPE bomb, 1903 garbage answers only, 1904 conflict + permanent-only leases, 1905 SOAP
faults, 1906 control URL on another host. HTTP 8000 serves the descriptions, SOAP and ``/state``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import trio

from lattice.nat.portmap import (
    Mapping,
    PortMapError,
    PortMapper,
    _http,
    external_multiaddr,
    parse_http_response,
    parse_ssdp_response,
    parse_xml,
)

HERE = Path(__file__).resolve()
SRC = HERE.parent.parent / "src"
ROUTER, CLIENT = "10.213.78.1", "10.213.78.2"
NATPMP_IP, UPNP_IP = "1.2.3.4", "5.6.7.8"  # the "external" addresses each fake router reports
STATE_URL = f"http://{ROUTER}:8000/state"


# ---------------------------------------------------------------------------- parsers, no network


def test_xml_guard():
    assert parse_xml(b"<a><b>1</b></a>", 100).find("b").text == "1"
    bomb = b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;">]><l>&b;</l>'
    for bad, why in (
        (bomb, "DOCTYPE"),
        (b'<!DOCTYPE x SYSTEM "file:///etc/passwd"><x/>', "DOCTYPE"),
        (b'<!doctype x SYSTEM "file:///etc/passwd"><x/>', "malformed"),  # XML is case-sensitive
        (b"<x>" + b"a" * 200 + b"</x>", "limit"),
        (b"<x>\xff\xfe</x>", "UTF-8"),
        ("<x/>".encode("utf-16"), "UTF-8"),
        (b"<x><y></x>", "malformed"),
    ):
        with pytest.raises(PortMapError, match=why):
            parse_xml(bad, 100)


def test_ssdp_and_http_parsers():
    ok = b"HTTP/1.1 200 OK\r\nLOCATION: http://10.0.0.1:5000/d.xml\r\nST: x\r\n\r\n"
    assert parse_ssdp_response(ok)["location"] == "http://10.0.0.1:5000/d.xml"
    for bad in (b"", b"NOTIFY * HTTP/1.1\r\n\r\n", b"HTTP/1.1 404 x\r\n\r\n", os.urandom(64), b"x" * 3000):
        assert parse_ssdp_response(bad) is None or "location" not in parse_ssdp_response(bad)
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
    assert parse_http_response(chunked, 100, "u") == (200, b"abcde")
    with pytest.raises(PortMapError, match="limit"):
        parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n", 100, "u")
    with pytest.raises(PortMapError, match="truncated"):
        parse_http_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nabc", 100, "u")
    with pytest.raises(PortMapError, match="truncated"):
        parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", 100, "u")
    with pytest.raises(PortMapError, match="bad HTTP"):
        parse_http_response(b"SSH-2.0-x\r\n\r\n", 100, "u")
    rng = random.Random(3)
    for _ in range(3000):
        junk = bytes(rng.getrandbits(8) for _ in range(rng.randrange(60)))
        parse_ssdp_response(junk)
        try:
            parse_http_response(b"HTTP/1.1 200 OK\r\n" + junk, 50, "u")
        except PortMapError:
            pass


async def test_http_client_reads_a_chunked_body_split_anywhere():
    """A chunk whose data ends in ``0\\r\\n`` followed by a pause is not taken for the last chunk."""
    first = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab0\r\n\r\n"
    rest = b"3\r\ncde\r\n0\r\nX-Trailer: 1\r\n\r\n"

    async def serve(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.send_all(first)
        await trio.sleep(0.3)
        await stream.send_all(rest)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        status, body = await _http(f"http://127.0.0.1:{port}/d.xml", 100, 2.0)
        for bad, why in ((b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", "limit"),
                         (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", "truncated")):  # fmt: skip
            first, rest = bad, b""
            with pytest.raises(PortMapError, match=why):
                await _http(f"http://127.0.0.1:{port}/d.xml", 100, 2.0)
        with pytest.raises(PortMapError, match="request"):
            await _http(f"http://127.0.0.1:{port}/a b", 100, 2.0)  # h11 refuses a space in the target
        nursery.cancel_scope.cancel()
    assert (status, body) == (200, b"ab0\r\ncde")


def test_external_multiaddr_and_public_flag():
    m = Mapping(NATPMP_IP, 4100, 4001, "TCP", "natpmp", 60, time.time() + 60, ROUTER)
    assert str(external_multiaddr(m)) == "/ip4/1.2.3.4/tcp/4100" and m.is_public
    assert not Mapping("100.64.1.2", 1, 1, "TCP", "upnp", 0, math.inf, ROUTER).is_public  # CGNAT


# ---------------------------------------------------------------------------- namespaces and runs


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


@pytest.fixture(scope="module")
def lan():
    """Router and client namespaces on a veth LAN, a namespace with no network, and the router process."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (ip) to create network namespaces")
    base = f"lt-{os.getpid()}-pm"  # the lt-<pid>- prefix lets lattice.testing reap leftovers
    router, client, offline = f"{base}-r", f"{base}-c", f"{base}-n"
    made: list[str] = []
    proc = None
    try:
        for ns in (router, client, offline):
            res = _ip("netns", "add", ns)
            if res.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {res.stderr.strip()}")
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        tag = os.getpid() % 100000
        for cmd in (
            [
                "link",
                "add",
                f"lp{tag}r",
                "netns",
                router,
                "type",
                "veth",
                "peer",
                "name",
                f"lp{tag}c",
                "netns",
                client,
            ],
            ["-n", router, "addr", "add", f"{ROUTER}/24", "dev", f"lp{tag}r"],
            ["-n", client, "addr", "add", f"{CLIENT}/24", "dev", f"lp{tag}c"],
            ["-n", router, "link", "set", f"lp{tag}r", "up"],
            ["-n", client, "link", "set", f"lp{tag}c", "up"],
            ["-n", client, "route", "add", "default", "via", ROUTER],
        ):
            res = _ip(*cmd)
            if res.returncode != 0:
                pytest.skip(f"cannot build the test LAN (ip {' '.join(cmd)}): {res.stderr.strip()}")
        proc = _spawn(router, "router")
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == "ready", proc.stderr.read()  # type: ignore[union-attr]
        yield {"router": router, "client": client, "offline": offline}
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        for ns in made:
            _ip("netns", "del", ns)


def _spawn(netns: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, str(HERE), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


_results: dict[str, dict] = {}


def _client(lan, scenario: str, netns: str = "client") -> dict:
    """Run a client scenario once (tests that share one read the same result)."""
    if scenario in _results:
        return _results[scenario]
    proc = _spawn(lan[netns], "client", scenario)
    try:
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    _results[scenario] = json.loads(out.strip().splitlines()[-1])
    return _results[scenario]


def test_natpmp_map_renew_and_delete(lan):
    r = _client(lan, "renewals")["natpmp"]
    m = r["mapping"]
    assert (m["method"], m["external_ip"], m["external_port"], m["gateway"]) == (
        "natpmp",
        NATPMP_IP,
        4001,
        ROUTER,
    )
    assert r["multiaddr"] == f"/ip4/{NATPMP_IP}/tcp/4001"
    assert r["renewed_expiry"] > m["expires_at"]  # renewed at half the 2 s lifetime
    assert r["state_mapped"]["4001"]["requests"] >= 2 and r["state_mapped"]["4001"]["lifetime"] == 2
    assert r["deleted"] and "4001" not in r["state_after"]["natpmp"]["good"]


def test_natpmp_port_change_on_renewal_is_reported(lan):
    r = _client(lan, "renewals")["flaky"]
    assert r["first"] == 5001 and r["changes"] and r["changes"][-1][1] > 5001
    assert r["current"] == r["changes"][-1][1]


def test_upnp_map_renew_and_delete(lan):
    r = _client(lan, "renewals")["upnp"]
    m = r["mapping"]
    assert (m["method"], m["external_ip"], m["external_port"]) == ("upnp", UPNP_IP, 4002)
    assert m["internal_ip"] == CLIENT and m["control_url"] == f"http://{ROUTER}:8000/good/ctl"
    assert m["service_type"].endswith("WANIPConnection:1")
    good = r["state_mapped"]["upnp"]["good"]
    assert good["mappings"]["4002"] == {"client": CLIENT, "port": 4002, "lease": 2, "desc": "lattice 4002"}
    assert good["calls"]["AddPortMapping"] >= 2 and r["renewed_expiry"] > m["expires_at"]
    after = r["state_after"]["upnp"]["good"]
    assert after["mappings"] == {} and after["calls"]["DeletePortMapping"] == 1


def test_falls_back_from_natpmp_to_upnp(lan):
    r = _client(lan, "fallback")
    assert r["mapping"]["method"] == "upnp" and r["elapsed"] < 1.5  # the closed port fails fast


def test_upnp_conflict_and_permanent_only_router(lan):
    r = _client(lan, "conflict")
    m = r["mapping"]
    assert m["external_port"] != 4003 and m["lifetime"] == 0 and r["permanent"]
    assert r["state"]["mappings"][str(m["external_port"])]["lease"] == 0


def test_hostile_natpmp_gateways_give_none_and_a_reason(lan):
    r = _client(lan, "natpmp_hostile")
    assert r["refused"] == [None, "result 2 (not authorized / refused)"]
    assert r["garbage"][0] is None and "malformed replies ignored" in r["garbage"][1]
    assert r["silent"][0] is None and "no answer" in r["silent"][1]
    assert r["closed"][0] is None and "no service" in r["closed"][1]


def test_hostile_igds_give_none_and_a_reason(lan):
    r = _client(lan, "upnp_hostile")
    for case, why in (
        ("huge", "limit"),
        ("doctype", "DOCTYPE"),
        ("garbage", "no Internet gateway device answered"),
        ("soapfault", "error 501"),
        ("foreign", "not on the device"),
    ):
        mapping, error = r[case]
        assert mapping is None and why in error, (case, error)
    assert "unusable answers ignored" in r["garbage"][1]
    assert r["elapsed"] < 4.0


def test_no_gateway_returns_none_without_raising(lan):
    r = _client(lan, "offline", netns="offline")
    assert r["mapping"] is None and r["elapsed"] < 1.0
    assert "no IPv4 default gateway" in r["error"] and "SSDP" in r["error"]


# ------------------------------------------------------------------- a real IGD: Debian's miniupnpd

MINIUPNPD_NFT = """
table inet filter {
  chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd; }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
}
"""
MINIUPNPD_CONF = """
ext_ifname=wan0
listening_ip={lan_if}
http_port=5000
enable_natpmp=yes
enable_upnp=yes
secure_mode=yes
system_uptime=yes
uuid=27d56cc7-3e34-4fd5-9347-2c34bbb49eba
upnp_table_name=filter
upnp_nat_table_name=filter
upnp_forward_chain=miniupnpd
upnp_nat_chain=prerouting_miniupnpd
upnp_nat_postrouting_chain=postrouting_miniupnpd
allow 1024-65535 10.213.79.0/24 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"""
MU_WAN, MU_EXTERNAL, MU_CLIENT = "1.2.3.1", "1.2.3.4", "10.213.79.2"


@pytest.fixture(scope="module")
def miniupnpd(tmp_path_factory):
    """internet (1.2.3.1) -- router running miniupnpd (wan 1.2.3.4, lan 10.213.79.1) -- client (.2)."""
    binary = shutil.which("miniupnpd") or shutil.which("miniupnpd", path="/usr/sbin:/sbin")
    if binary is None:
        pytest.skip("miniupnpd is not installed (apt-get install miniupnpd)")
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nft") is None:
        pytest.skip("needs root, iproute2 and nftables to run miniupnpd in a namespace")
    base = f"lt-{os.getpid()}-mu"
    wan, router, client = f"{base}-w", f"{base}-r", f"{base}-c"
    tag = os.getpid() % 100000
    made: list[str] = []
    proc = None
    tmp = tmp_path_factory.mktemp("miniupnpd")
    try:
        for ns in (wan, router, client):
            if _ip("netns", "add", ns).returncode != 0:
                pytest.skip("cannot create a network namespace")
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        lan_if = f"mu{tag}l"
        for cmd in (
            [
                "link",
                "add",
                lan_if,
                "netns",
                router,
                "type",
                "veth",
                "peer",
                "name",
                f"mu{tag}c",
                "netns",
                client,
            ],
            ["link", "add", "wan0", "netns", router, "type", "veth", "peer", "name", "up0", "netns", wan],
            ["-n", router, "addr", "add", "10.213.79.1/24", "dev", lan_if],
            ["-n", router, "addr", "add", f"{MU_EXTERNAL}/24", "dev", "wan0"],
            ["-n", client, "addr", "add", f"{MU_CLIENT}/24", "dev", f"mu{tag}c"],
            ["-n", wan, "addr", "add", f"{MU_WAN}/24", "dev", "up0"],
            *(["-n", ns, "link", "set", dev, "up"] for ns, dev in ((router, lan_if), (router, "wan0"))),
            *(["-n", ns, "link", "set", dev, "up"] for ns, dev in ((client, f"mu{tag}c"), (wan, "up0"))),
            ["-n", client, "route", "add", "default", "via", "10.213.79.1"],
            ["-n", router, "route", "add", "default", "via", MU_WAN],
        ):
            res = _ip(*cmd)
            if res.returncode != 0:
                pytest.skip(f"cannot build the miniupnpd LAN (ip {' '.join(cmd)}): {res.stderr.strip()}")
        inside = ["ip", "netns", "exec", router]
        subprocess.run(
            [*inside, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"], check=True, timeout=10
        )
        res = subprocess.run([*inside, "nft", "-f", "-"], input=MINIUPNPD_NFT, text=True, capture_output=True)
        if res.returncode != 0:
            pytest.skip(f"nftables unusable in a namespace: {res.stderr.strip()}")
        (tmp / "miniupnpd.conf").write_text(MINIUPNPD_CONF.format(lan_if=lan_if))
        log_path = tmp / "miniupnpd.log"
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(
                [*inside, binary, "-f", str(tmp / "miniupnpd.conf"), "-d", "-P", str(tmp / "pid")],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 5
        while "Listening for NAT-PMP" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"miniupnpd did not start: {log_path.read_text()[-500:]}")
            time.sleep(0.05)
        yield {"router": router, "client": client, "wan": wan, "log": log_path}
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in made:
            _ip("netns", "del", ns)


def _dial_from_internet(mu) -> str:
    code = (
        "import socket\n"
        "try:\n"
        f"    print(socket.create_connection(('{MU_EXTERNAL}', 4001), timeout=2).recv(64).decode())\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__)\n"
    )
    res = subprocess.run(
        ["ip", "netns", "exec", mu["wan"], sys.executable, "-c", code], capture_output=True, text=True
    )
    return res.stdout.strip()


@pytest.mark.parametrize("method", ["natpmp", "upnp"])
def test_real_miniupnpd_forwards_the_port_until_unmapped(miniupnpd, method):
    proc = _spawn(miniupnpd["client"], "client_real", method)
    try:
        first = json.loads(proc.stdout.readline() or "null")  # type: ignore[union-attr]
        assert first and first["mapping"], (first, miniupnpd["log"].read_text()[-2000:])
        m = first["mapping"]
        assert (m["method"], m["external_ip"], m["external_port"]) == (method, MU_EXTERNAL, 4001)
        rules = _ip(
            "netns",
            "exec",
            miniupnpd["router"],
            "nft",
            "list",
            "chain",
            "inet",
            "filter",
            "prerouting_miniupnpd",
        ).stdout
        assert MU_CLIENT in rules and "4001" in rules, rules
        # a host on the "internet" now reaches the client's listener through the router
        assert _dial_from_internet(miniupnpd) == "hello from behind the NAT"
        proc.stdin.write("unmap\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        assert json.loads(proc.stdout.readline()) == {"deleted": True}  # type: ignore[union-attr]
        rules = _ip(
            "netns",
            "exec",
            miniupnpd["router"],
            "nft",
            "list",
            "chain",
            "inet",
            "filter",
            "prerouting_miniupnpd",
        ).stdout
        assert MU_CLIENT not in rules, rules
        assert _dial_from_internet(miniupnpd) == "ConnectionRefusedError"
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------- client side


async def _client_real(method: str) -> None:
    """Listen on 4001, map it, report, wait for a line on stdin, unmap, report."""

    async def greet(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"hello from behind the NAT")

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_tcp, greet, 4001)
        pm = PortMapper(methods=(method,))
        m = await pm.map(4001, lifetime=120)
        print(json.dumps({"mapping": _mapping_json(m), "error": pm.last_error}), flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        print(json.dumps({"deleted": await pm.unmap(m) if m else False}), flush=True)
        nursery.cancel_scope.cancel()


def _mapping_json(m: Mapping | None) -> dict | None:
    if m is None:
        return None
    return {k: getattr(m, k) for k in Mapping.__slots__}


async def _state() -> dict:
    status, body = await _http(STATE_URL, 1 << 20, 2.0)
    assert status == 200
    return json.loads(body)


async def _scenario_renewals() -> dict:
    """The three renewal scenarios at once: they use different ports and router tables."""
    results: dict = {}

    async def run(name, fn) -> None:
        results[name] = await fn()

    async with trio.open_nursery() as nursery:
        for name, fn in (("natpmp", _natpmp), ("flaky", _natpmp_flaky), ("upnp", _upnp)):
            nursery.start_soon(run, name, fn)
    return results


async def _natpmp() -> dict:
    pm = PortMapper()  # gateway from the default route
    m = await pm.map(4001, lifetime=2)
    assert m is not None, pm.last_error
    async with trio.open_nursery() as nursery:
        await nursery.start(pm.run_renewals)
        await trio.sleep(1.3)  # one renewal, at half the 2 s lifetime
        nursery.cancel_scope.cancel()
    state = await _state()
    renewed = pm.mappings[4001]
    return {
        "mapping": _mapping_json(m),
        "multiaddr": str(external_multiaddr(m)),
        "renewed_expiry": renewed.expires_at,
        "state_mapped": state["natpmp"]["good"],
        "deleted": await pm.unmap(renewed),
        "state_after": await _state(),
    }


async def _natpmp_flaky() -> dict:
    pm = PortMapper(natpmp_port=5355, methods=("natpmp",))
    m = await pm.map(4001, lifetime=2)
    assert m is not None, pm.last_error
    changes: list[tuple[int, int | None]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(
            pm.run_renewals, lambda port, new: changes.append((port, new and new.external_port))
        )
        await trio.sleep(1.3)
        nursery.cancel_scope.cancel()
    current = pm.mappings[4001].external_port
    await pm.aclose()
    return {"first": m.external_port, "changes": changes, "current": current}


async def _upnp() -> dict:
    pm = PortMapper(methods=("upnp",))
    m = await pm.map(4002, lifetime=2)
    assert m is not None, pm.last_error
    async with trio.open_nursery() as nursery:
        await nursery.start(pm.run_renewals)
        await trio.sleep(1.3)
        nursery.cancel_scope.cancel()
    state = await _state()
    renewed = pm.mappings[4002].expires_at
    await pm.aclose()
    return {
        "mapping": _mapping_json(m),
        "renewed_expiry": renewed,
        "state_mapped": state,
        "state_after": await _state(),
    }


async def _scenario_fallback() -> dict:
    start = time.monotonic()
    pm = PortMapper(natpmp_port=5359)
    m = await pm.map(4004)
    elapsed = time.monotonic() - start
    if m is not None:
        await pm.unmap(m)
    return {"mapping": _mapping_json(m), "elapsed": elapsed, "error": pm.last_error}


async def _scenario_conflict() -> dict:
    pm = PortMapper(methods=("upnp",), ssdp_addr=("239.255.255.250", 1904))
    m = await pm.map(4003)
    assert m is not None, pm.last_error
    state = (await _state())["upnp"]["conflict"]
    await pm.aclose()
    return {"mapping": _mapping_json(m), "permanent": m.expires_at == math.inf, "state": state}


async def _try(results: dict, name: str, pm: PortMapper, port: int) -> None:
    m = await pm.map(port)
    results[name] = [_mapping_json(m), pm.last_error]


async def _scenario_natpmp_hostile() -> dict:
    results: dict = {}
    async with trio.open_nursery() as nursery:
        for name, port in (("refused", 5352), ("garbage", 5353), ("silent", 5354), ("closed", 5359)):
            pm = PortMapper(natpmp_port=port, methods=("natpmp",), timeout=0.8)
            nursery.start_soon(_try, results, name, pm, 4001)
    refused = results["refused"][1]
    results["refused"] = [results["refused"][0], refused[refused.index("result") :] if refused else None]
    return results


async def _scenario_upnp_hostile() -> dict:
    results: dict = {}
    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        for name, port in (
            ("huge", 1901),
            ("doctype", 1902),
            ("garbage", 1903),
            ("soapfault", 1905),
            ("foreign", 1906),
        ):
            pm = PortMapper(methods=("upnp",), ssdp_addr=("239.255.255.250", port), timeout=1.0)
            nursery.start_soon(_try, results, name, pm, 4005)
    results["elapsed"] = time.monotonic() - start
    return results


async def _scenario_offline() -> dict:
    start = time.monotonic()
    pm = PortMapper()
    m = await pm.map(4001)
    return {"mapping": _mapping_json(m), "elapsed": time.monotonic() - start, "error": pm.last_error}


# ---------------------------------------------------------------------------------- router side

GOOD_DESC = """<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
 <specVersion><major>1</major><minor>0</minor></specVersion>
 <device>
  <deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
  <friendlyName>fake IGD</friendlyName>
  <serviceList><service>
   <serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>
   <serviceId>urn:upnp-org:serviceId:L3Forwarding1</serviceId>
   <controlURL>/l3f</controlURL><eventSubURL>/l3f/evt</eventSubURL><SCPDURL>/l3f.xml</SCPDURL>
  </service></serviceList>
  <deviceList><device>
   <deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType>
   <deviceList><device>
    <deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
    <serviceList><service>
     <serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
     <serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
     <controlURL>{control}</controlURL><eventSubURL>/evt</eventSubURL><SCPDURL>/wanip.xml</SCPDURL>
    </service></serviceList>
   </device></deviceList>
  </device></deviceList>
 </device>
</root>
"""
BOMB = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10 if i > 1 else "&lol;" * 10}">' for i in range(1, 10))
    + "]><root>&lol9;</root>"
)
SSDP_PORTS = {
    1900: "good",
    1901: "huge",
    1902: "doctype",
    1903: "garbage",
    1904: "conflict",
    1905: "soapfault",
}
SSDP_PORTS[1906] = "foreign"
NATPMP_PORTS = {5351: "good", 5352: "refused", 5353: "garbage", 5354: "silent", 5355: "flaky"}


class FakeRouter:
    def __init__(self) -> None:
        self.natpmp: dict[str, dict] = {name: {} for name in NATPMP_PORTS.values()}
        self.upnp: dict[str, dict] = {
            name: {"mappings": {}, "calls": {}} for name in ("good", "conflict", "soapfault", "foreign")
        }

    # NAT-PMP
    async def natpmp_server(self, port: int, variant: str) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.bind(("0.0.0.0", port))
        self.ready += 1
        rng = random.Random(port)
        while True:
            data, addr = await sock.recvfrom(64)
            if variant == "silent" or len(data) < 2:
                continue
            if variant == "garbage":
                for junk in (
                    os.urandom(16),
                    b"\x00",
                    b"\x00\x99\x00\x00" + bytes(12),
                    bytes([1, 130]) + bytes(14),
                ):
                    await sock.sendto(junk, addr)
                await sock.sendto(bytes(rng.getrandbits(8) for _ in range(rng.randrange(40))), addr)
                continue
            epoch = int(time.monotonic())
            if data[1] == 0:
                await sock.sendto(struct.pack("!BBHI4s", 0, 128, 0, epoch, socket.inet_aton(NATPMP_IP)), addr)
                continue
            _, op, _, internal, suggested, lifetime = struct.unpack("!BBHHHI", data[:12])
            table = self.natpmp[variant]
            if variant == "refused":
                await sock.sendto(struct.pack("!BBHIHHI", 0, 128 + op, 2, epoch, internal, 0, 0), addr)
                continue
            if lifetime == 0:
                table.pop(str(internal), None)
                await sock.sendto(struct.pack("!BBHIHHI", 0, 128 + op, 0, epoch, internal, 0, 0), addr)
                continue
            entry = table.setdefault(str(internal), {"requests": 0})
            entry["requests"] += 1
            external = suggested or internal
            if variant == "flaky":
                external = 5000 + entry["requests"]
            entry.update(external=external, lifetime=lifetime)
            reply = struct.pack("!BBHIHHI", 0, 128 + op, 0, epoch, internal, external, lifetime)
            await sock.sendto(reply, addr)

    # SSDP
    async def ssdp_server(self, port: int, variant: str) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(("0.0.0.0", port))
        mreq = struct.pack("4s4s", socket.inet_aton("239.255.255.250"), socket.inet_aton(ROUTER))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        self.ready += 1
        while True:
            data, addr = await sock.recvfrom(2048)
            if not data.startswith(b"M-SEARCH") or b"ssdp:discover" not in data:
                continue
            st = next(
                (line[3:].strip() for line in data.decode().split("\r\n") if line.upper().startswith("ST:")),
                "",
            )
            head = (
                f"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: {st}\r\nUSN: uuid:x::{st}\r\nEXT:\r\n"
            )
            if variant == "garbage":
                for junk in (
                    os.urandom(100),
                    b"HTTP/1.1 404 Not Found\r\n\r\n",
                    head.encode() + b"\r\n",
                    head.encode() + b"LOCATION: https://10.213.78.1/desc.xml\r\n\r\n",
                    head.encode() + b"LOCATION: http://10.213.78.99:8000/good/desc.xml\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\n" + b"X" * 5000,
                ):
                    await sock.sendto(junk, addr)
                continue
            location = f"LOCATION: http://{ROUTER}:8000/{variant}/desc.xml\r\n"
            await sock.sendto((head + location + "SERVER: Linux UPnP/1.1 fake/1\r\n\r\n").encode(), addr)

    # HTTP: descriptions, SOAP control, state
    async def http_handler(self, stream: trio.SocketStream) -> None:
        buf = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in buf:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                buf += chunk
            head, _, body = buf.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path = lines[0].split()[:2]
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
            }
            while len(body) < int(headers.get("content-length", "0")):
                body += await stream.receive_some(4096)
            try:
                await self.respond(stream, method, path, headers, body)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def send(self, stream, status: int, body: bytes, chunked: bool = False) -> None:
        head = f"HTTP/1.1 {status} X\r\nContent-Type: text/xml\r\nConnection: close\r\n"
        if chunked:
            parts = [body[i : i + 100] for i in range(0, len(body), 100)]
            data = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
            await stream.send_all((head + "Transfer-Encoding: chunked\r\n\r\n").encode() + data)
        else:
            await stream.send_all((head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body)

    async def respond(self, stream, method: str, path: str, headers: dict, body: bytes) -> None:
        if path == "/state":
            await self.send(stream, 200, json.dumps({"natpmp": self.natpmp, "upnp": self.upnp}).encode())
            return
        variant, _, leaf = path.strip("/").partition("/")
        if leaf == "desc.xml":
            if variant == "huge":
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n\r\n<root>")
                for _ in range(10 * 1024):  # 10 MB without a length, until the client hangs up
                    await stream.send_all(b"<x/>" * 256)
            elif variant == "doctype":
                await self.send(stream, 200, BOMB.encode())
            else:
                control = (
                    f"http://10.213.78.99:8000/{variant}/ctl" if variant == "foreign" else f"/{variant}/ctl"
                )
                await self.send(stream, 200, GOOD_DESC.format(control=control).encode(), chunked=True)
            return
        if leaf != "ctl" or method != "POST" or variant not in self.upnp:
            await self.send(stream, 404, b"")
            return
        action = headers.get("soapaction", "").strip('"').rpartition("#")[2]
        args = {el.tag.rpartition("}")[2]: el.text or "" for el in ET.fromstring(body).iter()}
        state = self.upnp[variant]
        state["calls"][action] = state["calls"].get(action, 0) + 1
        fault = None
        out = ""
        if variant == "soapfault":
            fault = (501, "Action Failed")
        elif action == "AddPortMapping":
            if variant == "conflict" and args["NewLeaseDuration"] != "0":
                fault = (725, "OnlyPermanentLeasesSupported")
            elif variant == "conflict" and args["NewExternalPort"] == args["NewInternalPort"]:
                fault = (718, "ConflictInMappingEntry")
            else:
                state["mappings"][args["NewExternalPort"]] = {
                    "client": args["NewInternalClient"],
                    "port": int(args["NewInternalPort"]),
                    "lease": int(args["NewLeaseDuration"]),
                    "desc": args["NewPortMappingDescription"],
                }
        elif action == "GetExternalIPAddress":
            out = f"<NewExternalIPAddress>{UPNP_IP}</NewExternalIPAddress>"
        elif action == "DeletePortMapping":
            if state["mappings"].pop(args["NewExternalPort"], None) is None:
                fault = (714, "NoSuchEntryInArray")
        else:
            fault = (401, "Invalid Action")
        env = (
            '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>{}</s:Body></s:Envelope>'
        )
        if fault:
            detail = (
                "<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
                '<UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
                f"<errorCode>{fault[0]}</errorCode><errorDescription>{fault[1]}</errorDescription>"
                "</UPnPError></detail></s:Fault>"
            )
            await self.send(stream, 500, env.format(detail).encode())
        else:
            service = "urn:schemas-upnp-org:service:WANIPConnection:1"
            reply = f'<u:{action}Response xmlns:u="{service}">{out}</u:{action}Response>'
            await self.send(stream, 200, env.format(reply).encode())

    async def run(self) -> None:
        self.ready = 0
        async with trio.open_nursery() as nursery:
            for port, variant in NATPMP_PORTS.items():
                nursery.start_soon(self.natpmp_server, port, variant)
            for port, variant in SSDP_PORTS.items():
                nursery.start_soon(self.ssdp_server, port, variant)
            await nursery.start(trio.serve_tcp, self.http_handler, 8000)
            while self.ready < len(NATPMP_PORTS) + len(SSDP_PORTS):
                await trio.sleep(0.01)
            print("ready", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "router":
        trio.run(FakeRouter().run)
    elif sys.argv[1] == "client_real":
        trio.run(_client_real, sys.argv[2])
    elif sys.argv[1] == "client":
        print(json.dumps(trio.run(globals()[f"_scenario_{sys.argv[2]}"])), flush=True)


class _Namespaces:
    """Just enough of a Testbed for lattice.testing.daemons: processes in named namespaces."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.procs: list[subprocess.Popen] = []

    def popen(self, host: str, argv, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.names[host], *argv], start_new_session=True, **kw
        )
        self.procs.append(proc)
        return proc


def test_daemon_with_upnp_announces_the_mapped_address_and_is_reachable(miniupnpd, tmp_path):
    from lattice.testing.daemons import start_daemon, wait_for

    spaces = _Namespaces({"client": miniupnpd["client"], "wan": miniupnpd["wan"]})
    behind = start_daemon(
        tmp_path, "behind", ["--listen", "/ip4/0.0.0.0/tcp/4001", "--upnp"], spaces, "client"
    )
    outside = start_daemon(tmp_path, "outside", ["--listen", f"/ip4/{MU_WAN}/tcp/0"], spaces, "wan")
    try:
        mapped = f"/ip4/{MU_EXTERNAL}/tcp/4001"
        wait_for(lambda: behind.call("status")["nat"]["port_mapping"]["mapped"], 15, "a port mapping")
        assert f"{mapped}/p2p/{behind.peer_id}" in behind.call("id")["addrs"]
        # a node on the "internet" dials the announced address: the router forwards it to the daemon
        assert outside.call("connect", addr=f"{mapped}/p2p/{behind.peer_id}", timeout=10) == behind.peer_id
    finally:
        behind.stop()
        outside.stop()
