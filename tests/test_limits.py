"""Peer limits: token buckets, misbehaviour score, bans, per-IP caps (unit and real hosts)."""

from __future__ import annotations

import os

import pytest
import trio

from lattice import _proto
from lattice.config import NodeConfig
from lattice.errors import ConfigError, LatticeError
from lattice.identity import KeyPair
from lattice.multiaddr import Multiaddr
from lattice.node import Node
from lattice.swarm.profiles import DEFAULT, with_limits
from lattice.transport import open_host
from lattice.transport.limits import Limits, PeerLimits, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_and_rate_limits():
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert all(bucket.take(0.0) for _ in range(5)) and not bucket.take(0.0)
    assert bucket.take(0.1) and not bucket.take(0.1)  # 0.1 s at 10/s refills one token
    clock = Clock()
    limits = PeerLimits(Limits(protocol_per_s=10, protocol_burst=10, ban_score=100), clock)
    assert sum(limits.allow("p", "/x") for _ in range(50)) == 10
    assert limits.throttled["/x"] == 40 and not limits.is_banned("p")
    assert limits.allow("q", "/x") and limits.allow("p", "/y")  # budgets are per peer and protocol
    with pytest.raises(ConfigError):
        Limits(ban_score=0)


def test_score_decays_bans_expire_and_ip_rules():
    clock = Clock()
    limits = PeerLimits(Limits(ban_score=30, ban_seconds=60, score_decay_per_s=1, max_conns_per_ip=2), clock)
    assert limits.accept_ip("10.0.0.1") and limits.accept_ip("10.0.0.1") and not limits.accept_ip("10.0.0.1")
    limits.release_ip("10.0.0.1")
    assert limits.accept_ip("10.0.0.1")
    assert all(limits.accept_ip("127.0.0.1") for _ in range(10))  # exempt: a local testnet
    assert limits.accept_peer("p", "10.0.0.2")
    limits.penalize("p", 20, "junk")
    clock.now += 15  # 15 points forgiven
    assert not limits.penalize("p", 20, "junk") and limits.score("p") == pytest.approx(25)
    assert limits.penalize("p", 10, "junk")  # 35 >= 30: banned
    assert limits.is_banned("p") and not limits.accept_peer("p")
    assert not limits.accept_ip("10.0.0.2")  # its address too
    assert limits.status()["banned"] == 2 and limits.status()["ban_reasons"] == {"p": "junk"}
    clock.now += 61
    assert not limits.is_banned("p") and limits.accept_ip("10.0.0.2")


def _node(tmp_path, name, **limits) -> Node:
    cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / name, control=False,
                     reachability="public")  # fmt: skip
    return Node(cfg, swarm=with_limits(DEFAULT, **limits) if limits else None)


async def test_connection_cap_per_ip(tmp_path):
    async with (
        _node(tmp_path, "a", max_conns_per_ip=2, exempt_ips=()) as a,
        _node(tmp_path, "b") as b,
        _node(tmp_path, "c") as c,
        _node(tmp_path, "d") as d,
    ):
        with trio.fail_after(10):
            await b.connect(a.addrs[0])
            await c.connect(a.addrs[0])
            with pytest.raises(LatticeError):
                await d.connect(a.addrs[0])
        assert a.host.limits.refused_connections == 1 and len(a.host.connected_peers()) == 2


async def test_a_peer_sending_junk_is_banned_and_others_are_served(tmp_path):
    async with _node(tmp_path, "a") as a, _node(tmp_path, "b") as b, open_host(KeyPair.generate()) as junk:
        kad = a.dht.protocol_id
        with trio.fail_after(15):
            await b.connect(a.addrs[0])
            await junk.connect(a.addrs[0])
            sent = 0
            for _ in range(100):
                try:
                    stream = await junk.new_stream(a.peer_id, [kad])
                    body = os.urandom(40)
                    await stream.write(_proto.encode_uvarint(len(body)) + body)
                    sent += 1
                except LatticeError:
                    break  # the connection is gone: banned
                if a.host.limits.is_banned(junk.peer_id):
                    break
            while a.host.connection_to(junk.peer_id) or junk.connection_to(a.peer_id):
                await trio.sleep(0.01)
            assert a.host.limits.is_banned(junk.peer_id) and sent <= 15
            assert a.dht.counters["malformed"] >= 10
            # it cannot come back (refused right after the handshake) ...
            try:
                await junk.connect(a.addrs[0])
                with trio.move_on_after(2):
                    while junk.connection_to(a.peer_id) is not None:
                        await trio.sleep(0.01)
            except LatticeError:
                pass
            assert junk.connection_to(a.peer_id) is None and a.host.counters["inbound_refused_banned"] >= 1
            # ... while an honest peer is still served
            assert len(await b.ping(str(a.peer_id), count=3)) == 3
            assert await b.dht.put("still", b"fine") >= 1
        status = (await a.metrics())["limits"]
        assert status["bans_total"] == 1 and str(junk.peer_id) in status["banned_peers"]


async def test_a_flood_of_valid_requests_is_throttled(tmp_path):
    async with _node(tmp_path, "a", protocol_per_s=50, protocol_burst=50) as a, _node(tmp_path, "b") as b:
        with trio.fail_after(15):
            await b.connect(a.addrs[0])
            await a.host.wait_identified(b.peer_id)
            ok = failed = 0
            for _ in range(150):  # pooled DHT stream: limited per request, not only per stream
                try:
                    await b.dht._request(
                        a.peer_id, __import__("lattice.dht.protocol").dht.protocol.Message(5)
                    )
                    ok += 1
                except (LatticeError, trio.TooSlowError):
                    failed += 1
        assert ok < 150 and failed > 0
        assert a.host.limits.throttled[a.dht.protocol_id] > 0


def test_bans_command(tmp_path):
    import json
    import subprocess
    import sys
    import time

    from lattice.swarm.testnet import Testnet

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "lattice.cli", "bans", "--control", control, *args],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout

    with Testnet(tmp_path / "net", 2, metrics=False) as net:
        control = net.nodes[0].info["control"]
        victim = net.nodes[1].info["peer_id"]
        assert "(no bans)" in cli()
        cli("--ban", victim, "--seconds", "60")
        status = json.loads(cli("--json"))
        assert victim in status["banned_peers"] and status["ban_reasons"][victim] == "by the operator"
        deadline = time.monotonic() + 5
        while net.nodes[0].proc.poll() is None and time.monotonic() < deadline:
            with __import__("lattice").Client(control) as client:
                if victim not in [p["peer_id"] for p in client.peers()]:
                    break
            time.sleep(0.05)
        else:
            raise AssertionError("the banned peer is still connected")
        cli("--unban", victim)
        assert json.loads(cli("--json"))["banned_peers"] == {}


async def test_a_banned_ip_is_reset_at_accept_before_any_handshake(tmp_path):
    async with _node(tmp_path, "a", exempt_ips=()) as a, _node(tmp_path, "b") as b:
        ip, port = Multiaddr.parse(str(a.addrs[0])).tcp_target()
        a.host.limits.banned_ips["127.0.0.1"] = a.host.limits.clock() + 60
        with trio.fail_after(10):
            for _ in range(50):  # raw dials: each one reset by the host, none handshaken
                sock = trio.socket.socket()
                with sock:
                    try:  # the reset may even beat connect() back
                        await sock.connect((ip, port))
                        got = await sock.recv(100)
                    except ConnectionResetError:
                        got = b""
                    assert got == b""  # no Noise reply: closed before the handshake
            assert a.host.counters["inbound_refused_limits"] == 50
            assert a.host.counters.get("inbound_handshake_failed", 0) == 0
            assert a.host.limits.refused_connections == 50
            a.host.limits.unban("127.0.0.1")
            await b.connect(a.addrs[0])  # the listener still accepts (and handshakes) others
            assert len(await b.ping(str(a.peer_id), count=2)) == 2
