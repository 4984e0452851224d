"""mDNS discovery: the DNS codec (round trip, hostile bytes) and real discovery over multicast.

The multicast tests run their nodes as subprocesses inside network namespaces created for the test
(loopback with a multicast route, or a veth pair between two namespaces), so no packet leaves this
machine. They need root and iproute2 and are skipped with the reason otherwise. This file is also
the subprocesses' entry point: ``python tests/test_mdns.py node|flood ...``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from lattice.identity import KeyPair
from lattice.multiaddr import Multiaddr
from lattice.nat.mdns import (
    MDNS,
    SERVICE_NAME,
    TYPE_A,
    TYPE_PTR,
    TYPE_TXT,
    DNSError,
    Message,
    Question,
    Record,
    build_query,
    build_response,
    decode_message,
    encode_message,
    peers_from_response,
)

HERE = Path(__file__).resolve()
SRC = HERE.parent.parent / "src"


def _pid() -> str:
    return KeyPair.generate().peer_id.to_base58()


# ------------------------------------------------------------------------------------------ codec


def test_round_trip_with_compression():
    msg = Message(
        id=7,
        flags=0x8400,
        questions=[Question(SERVICE_NAME, TYPE_PTR, 0x8001)],
        answers=[Record(SERVICE_NAME, TYPE_PTR, 120, target="abc." + SERVICE_NAME)],
        authorities=[Record("host.local", TYPE_A, 60, raw=bytes([10, 0, 0, 1]))],
        additionals=[
            Record(
                "abc." + SERVICE_NAME, TYPE_TXT, 120, 0x8001, strings=(b"dnsaddr=/ip4/1.2.3.4/tcp/1", b"")
            ),
        ],
    )
    data = encode_message(msg)
    assert decode_message(data) == msg
    # the service name is written once, then referenced by compression pointers
    assert data.count(b"_p2p") == 1
    assert decode_message(build_query()).questions == [Question(SERVICE_NAME, TYPE_PTR)]


def test_response_carries_addresses_and_peer_id():
    me, other = _pid(), _pid()
    addrs = [Multiaddr.parse("/ip4/192.168.1.7/tcp/4001"), Multiaddr.parse(f"/ip4/10.0.0.2/tcp/9/p2p/{me}")]
    msg = decode_message(build_response("a" * 32, me, addrs))
    assert msg.is_response and msg.id == 0
    assert msg.answers[0].target == "a" * 32 + "." + SERVICE_NAME
    assert peers_from_response(msg) == {me: [addrs[0], addrs[1].without_peer()]}
    # a TXT record announcing a different peer under the same instance name is ignored
    msg.additionals.append(
        Record(
            "a" * 32 + "." + SERVICE_NAME,
            TYPE_TXT,
            strings=(f"dnsaddr=/ip4/6.6.6.6/tcp/1/p2p/{other}".encode(),),
        )
    )
    msg.additionals.append(
        Record("a" * 32 + "." + SERVICE_NAME, TYPE_TXT, strings=(b"dnsaddr=/bogus", b"x=y"))
    )
    assert peers_from_response(msg) == {me: [addrs[0], addrs[1].without_peer()]}


def test_rust_libp2p_style_answer_is_understood():
    # rust-libp2p names its instance with a bare random label and sets the cache-flush bit on TXT
    peer = _pid()
    name = "Zq7" * 12
    txt = Record(
        name, TYPE_TXT, 120, 0x8001, strings=(f"dnsaddr=/ip4/10.1.2.3/tcp/4001/p2p/{peer}".encode(),)
    )
    data = encode_message(
        Message(
            id=0xF8F8, flags=0x8400, answers=[Record(SERVICE_NAME, TYPE_PTR, target=name)], additionals=[txt]
        )
    )
    assert peers_from_response(decode_message(data)) == {peer: [Multiaddr.parse("/ip4/10.1.2.3/tcp/4001")]}


def test_handle_packet_ignores_own_answers_and_reports_others():
    me, other = _pid(), _pid()
    seen = []
    mdns = MDNS(me, lambda: [Multiaddr.parse("/ip4/10.0.0.1/tcp/1")], lambda p, a: seen.append((p, a)))
    assert mdns.handle_packet(build_query()) is True
    assert mdns.handle_packet(mdns.response()) is False and seen == []
    other_addr = Multiaddr.parse("/ip4/10.0.0.2/tcp/2")
    assert mdns.handle_packet(build_response("b" * 32, other, [other_addr])) is False
    assert mdns.handle_packet(build_response("b" * 32, other, [other_addr])) is False
    assert seen == [(other, [other_addr])]  # the repeat within the interval is not reported again
    # a changed address is reported at once
    new_addr = Multiaddr.parse("/ip4/10.0.0.3/tcp/2")
    mdns.handle_packet(build_response("b" * 32, other, [new_addr]))
    assert seen[-1] == (other, [new_addr])
    # queries for other services are not ours to answer
    assert not mdns.handle_packet(encode_message(Message(questions=[Question("_http._tcp.local")])))


def test_one_lan_address_cannot_flood_discovery_with_made_up_peers():
    """A spoofer announcing 1,000 peers from one address gets 16 reported; a real peer announced
    from another address still is."""
    from lattice.nat.mdns import MAX_PEERS_PER_SOURCE

    seen = []
    mdns = MDNS(_pid(), lambda: [], lambda p, a: seen.append(p))
    addr = [Multiaddr.parse("/ip4/192.168.1.66/tcp/1")]
    for i in range(1000):
        mdns.handle_packet(build_response(f"s{i}", _pid(), addr), "192.168.1.66")
    assert len(seen) == MAX_PEERS_PER_SOURCE and mdns.ignored == 1000 - MAX_PEERS_PER_SOURCE
    real = _pid()
    mdns.handle_packet(
        build_response("real", real, [Multiaddr.parse("/ip4/192.168.1.7/tcp/4001")]), "192.168.1.7"
    )
    assert seen[-1] == real


async def test_lan_dials_are_bounded_and_failed_peers_wait(host_factory):
    """The node side: remembered LAN peers are bounded, dials come from a bucket, and a peer whose
    dial failed is not dialed again for a while (fakes cannot use up discovery for good)."""
    from lattice.nat.manager import NATConfig, NATManager

    nat = NATManager(await host_factory(), NATConfig(mdns=True, mdns_max_peers=64, mdns_max_dials=4))
    for i in range(1000):
        nat._remember_lan_peer(str(_pid()), [Multiaddr.parse(f"/ip4/10.0.0.{i % 250 + 1}/tcp/1")])
    assert len(nat.mdns_found) == 64
    assert [nat._may_dial_lan_peer(f"p{i}") for i in range(6)] == [True] * 4 + [False] * 2  # the burst
    nat._mdns_failed["bad"] = time.monotonic() + 600
    nat._mdns_bucket.tokens = 4
    assert not nat._may_dial_lan_peer("bad") and nat._may_dial_lan_peer("good")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0" * 11,
        struct.pack("!6H", 0, 0, 1, 0, 0, 0) + b"\xc0\x0c\0\x0c\0\x01",  # pointer to itself
        struct.pack("!6H", 0, 0, 1, 0, 0, 0) + b"\xc0\x20\0\x0c\0\x01",  # pointer forward
        struct.pack("!6H", 0, 0, 1, 0, 0, 0) + b"\x05ab",  # truncated label
        struct.pack("!6H", 0, 0, 1, 0, 0, 0) + b"\x40abc\0\0\x0c\0\x01",  # reserved label type
        struct.pack("!6H", 0, 0, 1, 0, 0, 0) + (b"\x3f" + b"a" * 63) * 5 + b"\0\0\x0c\0\x01",  # > 255
        struct.pack("!6H", 0, 0x8400, 0, 1, 0, 0) + b"\0\0\x10\0\x01\0\0\0\x78\0\x05\x09abc",  # TXT
        struct.pack("!6H", 0, 0x8400, 0, 1, 0, 0) + b"\0\0\x0c\0\x01\0\0\0\x78\xff\xff",  # rdlength
        struct.pack("!6H", 0, 0, 60000, 0, 0, 0),
        b"\0" * 9001,
    ],
)
def test_malformed_messages_raise_dns_error(data):
    with pytest.raises(DNSError):
        decode_message(data)


def test_pointer_chain_is_bounded():
    # a legal backwards chain of 40 one-label names, each pointing at the previous one
    out = bytearray(struct.pack("!6H", 0, 0, 40, 0, 0, 0))
    prev = None
    for _ in range(40):
        start = len(out)
        out += b"\x01a" + (struct.pack("!H", 0xC000 | prev) if prev is not None else b"\0")
        out += b"\0\x0c\0\x01"
        prev = start
    with pytest.raises(DNSError, match=r"pointer|too long"):
        decode_message(bytes(out))


def test_garbage_never_raises_anything_else():
    rng = random.Random(1234)
    me = _pid()
    mdns = MDNS(me, lambda: [Multiaddr.parse("/ip4/10.0.0.1/tcp/1")], lambda p, a: None)
    valid = [build_query(), build_response("c" * 32, _pid(), [Multiaddr.parse("/ip4/10.0.0.9/tcp/4001")])]
    for i in range(30000):
        if i % 2:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))
            if i % 4 == 1:  # a plausible header makes the parser go deeper
                data = (
                    struct.pack("!6H", 0, rng.choice([0, 0x8400]), *(rng.randrange(4) for _ in range(4)))
                    + data
                )
        else:
            data = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
            data = bytes(data[: rng.randrange(len(data) + 1)])
        try:
            decode_message(data)
        except DNSError:
            pass
        mdns.handle_packet(data)


# ---------------------------------------------------------------------------- real multicast (netns)


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10)


def _netns_or_skip(name: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (ip) to create network namespaces")
    res = _run("ip", "netns", "add", name)
    if res.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {res.stderr.strip()}")
    _run("ip", "-n", name, "link", "set", "lo", "up")


@pytest.fixture
def lo_netns():
    """One namespace: loopback up, multicast routed to lo; several nodes share port 5353."""
    name = f"lt-{os.getpid()}-mdns"  # the lt-<pid>- prefix lets lattice.testing reap it if we die
    _netns_or_skip(name)
    try:
        assert _run("ip", "-n", name, "route", "add", "224.0.0.0/4", "dev", "lo").returncode == 0
        yield name
    finally:
        _run("ip", "netns", "del", name)


@pytest.fixture
def veth_netns():
    """Two namespaces joined by a veth pair (a two-host LAN): 10.213.77.1 and 10.213.77.2."""
    base = f"lt-{os.getpid()}-mdns"
    a, b = f"{base}-a", f"{base}-b"
    _netns_or_skip(a)
    try:
        _netns_or_skip(b)
        try:
            tag = os.getpid() % 100000
            for cmd in (
                [
                    "ip",
                    "link",
                    "add",
                    f"lm{tag}a",
                    "netns",
                    a,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    f"lm{tag}b",
                    "netns",
                    b,
                ],
                ["ip", "-n", a, "addr", "add", "10.213.77.1/24", "dev", f"lm{tag}a"],
                ["ip", "-n", b, "addr", "add", "10.213.77.2/24", "dev", f"lm{tag}b"],
                ["ip", "-n", a, "link", "set", f"lm{tag}a", "up"],
                ["ip", "-n", b, "link", "set", f"lm{tag}b", "up"],
            ):
                res = _run(*cmd)
                if res.returncode != 0:
                    pytest.skip(f"cannot set up a veth pair ({' '.join(cmd)}): {res.stderr.strip()}")
            yield a, b
        finally:
            _run("ip", "netns", "del", b)
    finally:
        _run("ip", "netns", "del", a)


_procs: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _kill_leftovers():
    yield
    while _procs:
        proc = _procs.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _spawn(netns: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, str(HERE), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    _procs.append(proc)
    return proc


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _results(procs: list[subprocess.Popen]) -> list[dict]:
    """Each node prints its result, then keeps answering until every node has printed (stdin closed)."""
    try:
        lines = [p.stdout.readline() for p in procs]  # type: ignore[union-attr]
    finally:
        for p in procs:
            p.stdin.close()  # type: ignore[union-attr]
    for p in procs:
        assert p.wait(timeout=10) == 0, p.stderr.read()  # type: ignore[union-attr]
    return [json.loads(line) for line in lines]


def _check_mutual(results: list[dict]) -> None:
    for me in results:
        others = {r["peer_id"]: r["addr"] for r in results if r is not me}
        assert me["found"] == {pid: [addr] for pid, addr in others.items()}, me  # and never itself
        assert me["elapsed"] < 3.0


def test_two_processes_on_one_host_discover_each_other(lo_netns):
    procs = [_spawn(lo_netns, "node", f"/ip4/127.0.0.1/tcp/{4001 + i}", "1") for i in range(2)]
    _check_mutual(_results(procs))


def test_two_hosts_on_a_lan_discover_each_other(veth_netns):
    procs = [_spawn(ns, "node", f"/ip4/10.213.77.{i + 1}/tcp/4001", "1") for i, ns in enumerate(veth_netns)]
    _check_mutual(_results(procs))


def test_answers_are_rate_limited_and_garbage_is_survived(lo_netns):
    res = _result(_spawn(lo_netns, "flood"))
    assert res["answers_sent"] <= 3, res  # 60 queries in ~0.6 s, at most one answer a second
    assert res["answers_received"] >= 1 and res["answered_after_garbage"], res


# ------------------------------------------------------------------------------- subprocess bodies


async def _node(listen: str, want: int, timeout: float = 5.0) -> None:
    me = _pid()
    found: dict[str, list[str]] = {}
    done = trio.Event()

    def on_peer(peer: str, addrs: list[Multiaddr]) -> None:
        found[peer] = [str(a) for a in addrs]
        if len(found) >= want:
            done.set()

    mdns = MDNS(me, lambda: [Multiaddr.parse(listen)], on_peer)
    async with trio.open_nursery() as nursery:
        await nursery.start(mdns.run)
        start = trio.current_time()
        with trio.move_on_after(timeout):
            await done.wait()
        elapsed = trio.current_time() - start
        print(json.dumps({"peer_id": me, "addr": listen, "found": found, "elapsed": elapsed}), flush=True)
        with trio.move_on_after(10):  # keep answering until the test has every node's result
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        nursery.cancel_scope.cancel()


async def _flood() -> dict:
    mdns = MDNS(_pid(), lambda: [Multiaddr.parse("/ip4/127.0.0.1/tcp/4001")], lambda p, a: None, interval=60)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    await sock.bind(("", 5353))  # a second listener on the shared port sees the answers
    received = []

    async def listen() -> None:
        while True:
            data, _ = await sock.recvfrom(9001)
            try:
                if decode_message(data).is_response:
                    received.append(trio.current_time())
            except DNSError:
                pass

    rng = random.Random(5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen)
        await nursery.start(mdns.run)
        await trio.sleep(1.2)  # let the start-up query and its answer pass
        sent_before = mdns.answers_sent
        for _ in range(60):
            await sock.sendto(build_query(), ("224.0.0.251", 5353))
            await trio.sleep(0.01)
        await trio.sleep(1.2)
        flood_answers = mdns.answers_sent - sent_before
        for _ in range(500):
            garbage = bytes(rng.getrandbits(8) for _ in range(rng.randrange(200)))
            await sock.sendto(garbage, ("224.0.0.251", 5353))
        mark = trio.current_time()
        await sock.sendto(build_query(), ("224.0.0.251", 5353))
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    return {
        "answers_sent": flood_answers,
        "answers_received": len(received),
        "answered_after_garbage": any(t > mark for t in received),
    }


if __name__ == "__main__":
    if sys.argv[1] == "node":
        trio.run(_node, sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "flood":
        print(json.dumps(trio.run(_flood)), flush=True)
