"""The content commands of `lattice-node` against real daemons (add, get with its progress bar, pins,
content status, a killed get resumed) and the blocking facade (``Node.start(...).content``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from lattice import Node, NodeConfig
from lattice.testing.daemons import start_daemon

CLI = [sys.executable, "-m", "lattice.cli"]
LOOPBACK = ["--listen", "/ip4/127.0.0.1/tcp/0"]
MIB = 1 << 20


def cli(daemon, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args, "--control", daemon.info["control"]],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_add_get_pins_and_status_through_the_cli(tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(3 * MIB + 17))
    a = start_daemon(tmp_path, "a", LOOPBACK)
    b = start_daemon(tmp_path, "b", LOOPBACK)
    try:
        added = cli(a, "add", str(blob))
        assert added.returncode == 0, added.stderr
        cid = added.stdout.strip()
        assert cid.startswith("b") and len(cid.splitlines()) == 1  # the id alone: scripts use it
        out = tmp_path / "out.bin"
        got = cli(b, "get", cid, "-o", str(out), "--provider", a.info["addrs"][0], "--only-providers")
        assert got.returncode == 0, got.stderr
        assert out.read_bytes() == blob.read_bytes()
        assert "4 chunks fetched, 0 already here" in got.stdout, got.stdout
        assert "MiB/s" in got.stdout and "provider(s)" in got.stdout  # the progress bar's last state
        again = cli(b, "get", cid, "--json")  # complete in the store: nothing moves
        assert json.loads(again.stdout)["fetched"] == 0
        pins = json.loads(cli(b, "pins", "--json").stdout)
        assert [(p["cid"], p["size"], p["state"]) for p in pins] == [(cid, 3 * MIB + 17, "complete")]
        table = cli(b, "pins").stdout
        assert cid[:20] in table.replace("\n", "") or "1 pinned" in table
        status = json.loads(cli(b, "content", "status", "--json").stdout)
        assert status["serving"]["chunks_fetched"] == 4 and status["store"]["pinned"] == 1
        assert "4 chunks" in cli(b, "content", "status").stdout
        served = json.loads(cli(a, "content", "status", "--json").stdout)["serving"]
        assert served["chunks_served"] == 4
        assert cli(b, "content", "unpin", cid).stdout.strip() == "unpinned"
        assert "removed 1 object(s)" in cli(b, "content", "gc").stdout
        bad = cli(b, "get", "not-an-id")
        assert bad.returncode == 2 and bad.stderr.startswith("lattice-node: error:")
        alone = cli(b, "get", cid, "--only-providers")
        assert alone.returncode == 2 and "needs at least one --provider" in alone.stderr
        missing = cli(a, "add", str(tmp_path / "nope"))
        assert missing.returncode == 2 and "is not a file" in missing.stderr
    finally:
        a.stop()
        b.stop()


def test_a_killed_get_stops_its_fetch_and_the_next_get_moves_only_the_missing_chunks(tmp_path):
    config = tmp_path / "slow.toml"
    config.write_text("[node.content]\nserve_peer_rate = 2097152\n")  # 2 MiB/s: the get takes seconds
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(12 * MIB))
    a = start_daemon(tmp_path, "a", [*LOOPBACK, "--config", str(config)])
    b = start_daemon(tmp_path, "b", LOOPBACK)
    try:
        cid = cli(a, "add", str(blob), "--chunk-size", "256KiB").stdout.strip()
        provider = a.info["addrs"][0]
        first = subprocess.Popen(
            [*CLI, "get", cid, "--provider", provider, "--control", b.info["control"], "-q"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        fetched = 0
        while fetched < 8 and time.monotonic() < deadline:
            progress = b.call("content.status")["fetching"].get(cid)
            fetched = progress["fetched"] if progress else 0
            time.sleep(0.05)
        assert fetched >= 8
        first.send_signal(signal.SIGKILL)
        first.wait(5)
        time.sleep(0.5)
        status = b.call("content.status")
        assert status["fetching"] == {}, status["fetching"]  # the daemon stopped fetching
        (row,) = status["objects"]
        had = row["have_chunks"]
        assert 8 <= had < 48 and row["state"] == "partial"
        out = tmp_path / "out.bin"
        second = cli(b, "get", cid, "-o", str(out), "--provider", provider, "--json")
        result = json.loads(second.stdout)
        assert result["had"] == had and result["fetched"] == 48 - had, result  # only the missing moved
        assert out.read_bytes() == blob.read_bytes()
    finally:
        a.stop()
        b.stop()


def test_the_blocking_facade_adds_and_gets_with_the_same_names(tmp_path):
    def config(name: str) -> NodeConfig:
        return NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / name, control=False)

    a, b = Node.start(config("a")), Node.start(config("b"))
    try:
        data = os.urandom(MIB + 5)
        cid = a.content.add(data)
        weights = {"w": __import__("numpy").arange(12, dtype="float32").reshape(3, 4)}
        tcid = a.content.add(weights)
        seen = []
        path = b.content.get(cid, tmp_path / "out.bin", providers=[a.addrs[0]], on_progress=seen.append)
        assert path.read_bytes() == data and seen[-1]["fetched"] == 2
        got = b.content.get_tensors(tcid, ["w"], providers=[a.addrs[0]])
        assert (got["w"] == weights["w"]).all()
        assert [p["cid"] for p in b.content.pins()] == [str(cid)]
        assert b.content.status()["serving"]["chunks_fetched"] >= 3
    finally:
        b.close()
        a.close()
