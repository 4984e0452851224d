"""/dnsaddr/ bootstrap addresses: the resolver's bounds (pure, a fake zone) and a real DNS server
(dnsmasq in a loopback-only network namespace) publishing a swarm's bootstrap list."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import trio

from _lattica import LoopbackNamespace
from lattice.identity import KeyPair
from lattice.multiaddr import Multiaddr
from lattice.testing.daemons import start_daemon, wait_for
from lattice.transport.dnsaddr import DnsaddrError, DnsaddrLimits, resolve, resolve_all, txt_addrs

P1, P2, P3 = (KeyPair.generate().peer_id for _ in range(3))


def zone(records: dict[str, list[str]], asked: list[str] | None = None):
    """A fake TXT lookup over ``records`` (name -> values) that logs each query in ``asked``."""

    async def lookup(name: str) -> list[str]:
        if asked is not None:
            asked.append(name)
        return records.get(name, [])

    return lookup


def test_txt_values_other_than_multiaddrs_are_skipped():
    values = [
        f"dnsaddr=/ip4/1.2.3.4/tcp/4001/p2p/{P1}",
        "v=spf1 -all",
        "dnsaddr=/not/a/multiaddr",
        "dnsaddr=",
    ]
    assert txt_addrs(values) == [Multiaddr.parse(f"/ip4/1.2.3.4/tcp/4001/p2p/{P1}")]
    assert txt_addrs(["dnsaddr=/ip4/1.2.3.4/tcp/1" + "0" * 2000]) == []  # over txt_max_len


async def test_recursive_records_and_the_peer_id_filter():
    records = {
        "_dnsaddr.swarm.test": ["dnsaddr=/dnsaddr/boot.test", f"dnsaddr=/ip4/10.0.0.3/tcp/4001/p2p/{P3}"],
        "_dnsaddr.boot.test": [
            f"dnsaddr=/ip4/10.0.0.1/tcp/4001/p2p/{P1}",
            f"dnsaddr=/ip6/fd00::1/tcp/4001/p2p/{P1}",
            f"dnsaddr=/ip4/10.0.0.2/tcp/4001/p2p/{P2}",
        ],
    }
    found = await resolve(Multiaddr.parse("/dnsaddr/swarm.test"), zone(records))
    assert [str(a.peer_id) for a in found] == [str(P3), str(P1), str(P1), str(P2)]
    # /p2p/ID after the domain keeps only values ending in that id (go and rust libp2p do the same:
    # a nested /dnsaddr/ value without it is dropped too)
    only = await resolve(Multiaddr.parse(f"/dnsaddr/boot.test/p2p/{P1}"), zone(records))
    assert [str(a) for a in only] == [f"/ip4/10.0.0.1/tcp/4001/p2p/{P1}", f"/ip6/fd00::1/tcp/4001/p2p/{P1}"]
    with pytest.raises(DnsaddrError):
        await resolve(Multiaddr.parse(f"/dnsaddr/swarm.test/p2p/{P1}"), zone(records))


async def test_loops_depth_and_fan_out_are_bounded():
    asked: list[str] = []
    loop = {"_dnsaddr.a.test": ["dnsaddr=/dnsaddr/b.test", "dnsaddr=/dnsaddr/a.test"],
            "_dnsaddr.b.test": ["dnsaddr=/dnsaddr/a.test"]}  # fmt: skip
    with pytest.raises(DnsaddrError, match="no address"):
        await resolve(Multiaddr.parse("/dnsaddr/a.test"), zone(loop, asked))
    assert asked == ["_dnsaddr.a.test", "_dnsaddr.b.test"]  # each name once
    # a chain deeper than max_depth stops there
    chain = {f"_dnsaddr.{i}.test": [f"dnsaddr=/dnsaddr/{i + 1}.test"] for i in range(100)}
    asked.clear()
    with pytest.raises(DnsaddrError):
        await resolve(Multiaddr.parse("/dnsaddr/0.test"), zone(chain, asked), DnsaddrLimits(max_depth=4))
    assert len(asked) == 5
    # a fan-out of names: at most max_lookups queries; of records: max_records used per answer
    fan = {"_dnsaddr.f.test": [f"dnsaddr=/dnsaddr/{i}.x.test" for i in range(1000)]}
    fan |= {f"_dnsaddr.{i}.x.test": [f"dnsaddr=/ip4/10.0.{i // 250}.{i % 250}/tcp/1"] for i in range(1000)}
    asked.clear()
    limits = DnsaddrLimits(max_lookups=32, max_records=16, max_addrs=32)
    found = await resolve(Multiaddr.parse("/dnsaddr/f.test"), zone(fan, asked), limits)
    assert len(asked) == 17 and len(found) == 16  # 1 + the 16 names used from the first answer
    many = {"_dnsaddr.m.test": [f"dnsaddr=/ip4/10.1.0.{i}/tcp/1" for i in range(200)]}
    found = await resolve(
        Multiaddr.parse("/dnsaddr/m.test"), zone(many), DnsaddrLimits(max_records=200, max_addrs=8)
    )
    assert len(found) == 8


async def test_a_slow_server_is_bounded_and_others_kept():
    async def stalls(name: str) -> list[str]:
        await trio.sleep(3600)
        return []

    direct = Multiaddr.parse(f"/ip4/10.0.0.9/tcp/1/p2p/{P1}")
    with trio.fail_after(5):
        got = await resolve_all(
            [Multiaddr.parse("/dnsaddr/slow.test"), direct], stalls, DnsaddrLimits(timeout=0.2)
        )
    assert got == [direct]


WHY_NOT = LoopbackNamespace.unavailable() or (None if shutil.which("dnsmasq") else "dnsmasq not installed")


@pytest.mark.skipif(WHY_NOT is not None, reason=f"a real DNS server in a namespace: {WHY_NOT}")
def test_a_swarm_joined_through_dns_records(tmp_path):
    """An operator publishes the bootstrap list as TXT records (two levels: the swarm's name points
    to its bootstrap host names); a node joins with the swarm's profile file and nothing else."""
    with LoopbackNamespace() as ns:
        profile = ["--join", "mynet", "--swarm-file", str(_profile(tmp_path))]
        boot_args = ["--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap-node", *profile]
        boots = [start_daemon(tmp_path, f"boot{i}", boot_args, wrapper=ns.wrapper) for i in range(2)]
        records = ["_dnsaddr.mynet.test,dnsaddr=/dnsaddr/boot.mynet.test"] + [
            f"_dnsaddr.boot.mynet.test,dnsaddr={b.info['addrs'][0]}" for b in boots
        ]
        dns = subprocess.Popen(
            [*ns.wrapper, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
             "--listen-address=127.0.0.1", "--port=53", "--pid-file", "--log-queries", "--log-facility=-",
             *(f"--txt-record={r}" for r in records)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        joiner = None
        try:
            args = ["--listen", "/ip4/127.0.0.1/tcp/0", *profile, "--dns-server", "127.0.0.1"]
            joiner = start_daemon(tmp_path, "joiner", args, wrapper=ns.wrapper)
            for boot in boots:
                wait_for(lambda b=boot: b.peer_id in [p["peer_id"] for p in joiner.call("peers")], 15,
                         f"joined {boot.name} through DNS")  # fmt: skip
            wait_for(lambda: joiner.call("dht.status")["routing_table"] >= 2, 15, "DHT contacts")
            assert joiner.call("dht.put", key="through-dns", value="yes") >= 2
            assert [e["value"] for e in boots[1].call("dht.get", key="through-dns")] == [b"yes"]
            # a name without records: the daemon stops with one line that says so
            lonely = subprocess.run(
                [*ns.wrapper, sys.executable, "-m", "lattice.cli", "run", "--data-dir",
                 str(tmp_path / "lonely"), "--listen", "/ip4/127.0.0.1/tcp/0",
                 "--bootstrap", "/dnsaddr/nobody.test", "--dns-server", "127.0.0.1", "--log-level", "error"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            errors = [ln for ln in lonely.stderr.splitlines() if ln.startswith("lattice-node: error:")]
            assert lonely.returncode != 0 and len(errors) == 1, lonely.stderr
            assert "/dnsaddr/nobody.test did not resolve" in errors[0] and "Traceback" not in lonely.stderr
        finally:
            for d in [*boots, *([joiner] if joiner else [])]:
                d.stop()
            dns.terminate()
            log = dns.communicate(timeout=5)[0]
        assert "_dnsaddr.mynet.test" in log and "_dnsaddr.boot.mynet.test" in log  # asked the real server


def _profile(tmp_path) -> str:
    path = tmp_path / "mynet.toml"
    if not path.exists():
        path.write_text('[swarm.mynet]\nbootstrap = ["/dnsaddr/mynet.test"]\n')
    return path
