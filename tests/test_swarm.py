"""Swarm profiles: parsing, protocol ids per swarm, and separation of swarms (real nodes, daemons)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio

from lattice.config import NodeConfig
from lattice.errors import ConfigError
from lattice.node import Node
from lattice.swarm.profiles import DEFAULT, SwarmProfile, load_profiles, resolve, swarm_of
from lattice.swarm.testnet import Testnet

OTHER = """
[swarm.other]
bootstrap = []
[swarm.other.limits]
max_conns_per_ip = 4
"""


def test_swarm_of_and_derived_ids():
    assert swarm_of("lattice/1.0.0") == "default"
    assert swarm_of("lattice/mynet/1") == "mynet"
    assert swarm_of("ipfs/0.1.0") is None and swarm_of("") is None
    assert DEFAULT.kad_protocol == "/lattice/kad/1.0.0" and DEFAULT.identify_version == "lattice/1.0.0"
    p = SwarmProfile("x", "mynet")
    assert p.kad_protocol == "/lattice/mynet/kad/1.0.0" and p.identify_version == "lattice/mynet/1"
    with pytest.raises(ConfigError, match="swarm id"):
        SwarmProfile("x", "Bad Name")
    with pytest.raises(ConfigError, match="must read lattice/mynet"):
        SwarmProfile("x", "mynet", identify_version="lattice/other/1")


def test_profile_files(tmp_path):
    path = tmp_path / "swarms.toml"
    path.write_text(OTHER)
    assert load_profiles(path)["other"].limits.max_conns_per_ip == 4
    assert resolve("other", path).swarm_id == "other"
    with pytest.raises(ConfigError, match="unknown swarm 'nope'"):
        resolve("nope", path)
    path.write_text('[swarm.other]\nbootstrap = ["/ip4/1.2.3.4/tcp/1"]\n')
    with pytest.raises(ConfigError, match="needs /tcp/PORT/p2p/PEER"):
        load_profiles(path)
    path.write_text("[swarm.other]\ncolour = 1\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        load_profiles(path)


def _node(tmp_path, name: str, swarm: str = "default", swarm_file=None) -> Node:
    cfg = NodeConfig(
        listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / name, control=False, reachability="public",
        swarm=swarm, swarm_file=swarm_file,
    )  # fmt: skip
    return Node(cfg)


async def test_a_node_of_another_swarm_stays_out_of_routing_tables(tmp_path):
    path = tmp_path / "swarms.toml"
    path.write_text(OTHER)
    async with (
        _node(tmp_path, "a") as a,
        _node(tmp_path, "b") as b,
        _node(tmp_path, "x", "other", path) as x,
    ):
        assert x.host.config.protocol_version == "lattice/other/1"
        assert "/lattice/other/kad/1.0.0" in x.host.protocols and "/lattice/kad/1.0.0" not in x.host.protocols
        with trio.fail_after(10):
            await b.connect(a.addrs[0])
            await x.connect(a.addrs[0])
            await x.connect(b.addrs[0])
            for node, peer in ((a, x), (b, x), (x, a), (x, b), (a, b)):
                await node.host.wait_identified(peer.peer_id)
            while a.dht.table.get(b.peer_id) is None:
                await trio.sleep(0.01)
        assert a.dht.table.get(x.peer_id) is None and b.dht.table.get(x.peer_id) is None
        assert len(x.dht.table) == 0
        assert a.swarm_guard.foreign == {x.peer_id: "other"}
        assert (await x.status())["swarm"] == "other" and (await a.status())["swarm"] == "default"
        # x's DHT cannot reach the default swarm: its protocol id is not spoken there
        assert await x.dht.put("k", b"v") == 1  # only x itself stored it
        assert await a.dht.get("k") == []


def test_joining_with_bootstrap_peers_of_another_swarm_is_a_clear_error(tmp_path):
    path = tmp_path / "swarms.toml"
    path.write_text(OTHER)
    with Testnet(tmp_path / "net", 2) as net:
        result = subprocess.run(
            [sys.executable, "-m", "lattice.cli", "run", "--listen", "/ip4/127.0.0.1/tcp/0",
             "--data-dir", str(tmp_path / "x"), "--join", "other", "--swarm-file", str(path),
             "--bootstrap", net.bootstrap_addr, "--reachability", "public", "--log-level", "error"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 2, result
        error = [line for line in result.stderr.splitlines() if line.startswith("lattice-node: error:")]
        assert len(error) == 1, result.stderr
        assert "'other'" in error[0] and "'default'" in error[0], error
        assert net.routing_sizes() == [1, 1]


def test_bootstrap_peers_of_an_incompatible_version_are_a_clear_error(tmp_path):
    path = tmp_path / "swarms.toml"
    path.write_text(OTHER + '[swarm.other-v2]\nid = "other"\nkad_protocol = "/lattice/other/kad/2.0.0"\n')
    with Testnet(tmp_path / "net", 1, ["--join", "other", "--swarm-file", str(path)]) as net:
        result = subprocess.run(
            [sys.executable, "-m", "lattice.cli", "run", "--listen", "/ip4/127.0.0.1/tcp/0",
             "--data-dir", str(tmp_path / "x"), "--join", "other-v2", "--swarm-file", str(path),
             "--bootstrap", net.bootstrap_addr, "--reachability", "public", "--log-level", "error"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert result.returncode == 2, result
    error = [line for line in result.stderr.splitlines() if line.startswith("lattice-node: error:")]
    assert len(error) == 1 and "incompatible versions" in error[0], result.stderr
    assert "/lattice/other/kad/1.0.0" in error[0] and "/lattice/other/kad/2.0.0" in error[0]


def test_join_without_bootstrap_peers_says_so(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lattice.cli", "run", "--data-dir", str(tmp_path), "--join", "lattica"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "lists no bootstrap peers" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "lattice.cli", "run", "--data-dir", str(tmp_path), "--join", "nope"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2 and "unknown swarm 'nope'" in result.stderr
