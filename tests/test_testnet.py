"""`lattice-node testnet`: real daemons around one bootstrap, found through the DHT, stopped together."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from lattice.control.client import Client
from lattice.swarm.testnet import Testnet


def test_testnet_nodes_find_each_other_through_the_dht(tmp_path):
    with Testnet(tmp_path, 4) as net:
        assert len({n.info["peer_id"] for n in net.nodes}) == 4
        net.wait_dht(timeout=20)
        assert net.routing_sizes() == [3, 3, 3, 3]
        with Client(net.nodes[1].info["control"]) as a, Client(net.nodes[3].info["control"]) as b:
            assert a.dht.put("greeting", b"hi") >= 2
            assert [e["value"] for e in b.dht.get("greeting")] == [b"hi"]
        listed = json.loads((tmp_path / "testnet.json").read_text())
        assert [row["name"] for row in listed] == ["node0", "node1", "node2", "node3"]
    assert all(n.proc.poll() is not None for n in net.nodes)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_testnet_command_prints_nodes_and_ctrl_c_stops_all(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "lattice.cli", "testnet", "--nodes", "3", "--json", "--dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        summary = json.loads(proc.stdout.readline())
        assert len(summary["nodes"]) == 3 and summary["dht_converged_s"] is not None
        pids = [n["pid"] for n in summary["nodes"]]
        assert all(_alive(p) for p in pids)
        with Client(summary["nodes"][2]["control"]) as client:
            assert client.status()["peers"] >= 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in pids)
        assert "stopped 3 node(s)" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
