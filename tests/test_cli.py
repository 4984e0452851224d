"""The daemon and CLI as real processes: two daemons, a third process driving one, bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

CLI = [sys.executable, "-m", "lattice.cli"]


def run_cli(*args, timeout=30):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def start_daemon(tmp_path, name, *extra):
    ready = tmp_path / f"{name}.json"
    proc = subprocess.Popen(
        [
            *CLI,
            "run",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--data-dir",
            str(tmp_path / name),
            "--ready-file",
            str(ready),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 15
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("daemon not ready in 15 s")
        time.sleep(0.02)
    return proc, json.loads(ready.read_text())


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def assert_one_line_error(result):
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_two_daemons_bootstrap_peers_ping_and_client(tmp_path):
    a, a_info = start_daemon(tmp_path, "a")
    b = None
    try:
        b, b_info = start_daemon(tmp_path, "b", "--bootstrap", a_info["addrs"][0])
        assert a_info["peer_id"].startswith("12D3KooW") and a_info["control"].endswith("control.sock")
        deadline = time.monotonic() + 10
        while True:
            peers = json.loads(run_cli("peers", "--json", "--control", a_info["control"]).stdout)
            if any(p["peer_id"] == b_info["peer_id"] for p in peers) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert [p["peer_id"] for p in peers] == [b_info["peer_id"]]
        peers_b = json.loads(run_cli("peers", "--json", "--control", b_info["control"]).stdout)
        assert [p["peer_id"] for p in peers_b] == [a_info["peer_id"]]
        pong = run_cli("ping", a_info["addrs"][0], "-c", "2", "--control", b_info["control"])
        assert pong.returncode == 0 and pong.stdout.count("pong") == 2, pong.stderr
        status = run_cli("status", "--control", b_info["control"])
        assert status.returncode == 0 and b_info["peer_id"] in status.stdout
        # a third process drives a daemon through lattice.Client
        code = (
            "import sys; from lattice import Client\n"
            "c = Client(sys.argv[1]); print(len(c.peers()), c.id()['peer_id'])"
        )
        third = subprocess.run(
            [sys.executable, "-c", code, a_info["control"]], capture_output=True, text=True, timeout=30
        )
        assert third.stdout.split() == ["1", a_info["peer_id"]], third.stderr
        assert run_cli("id", "--control", a_info["control"]).stdout.strip() == a_info["peer_id"]
        assert (
            run_cli("id", "--key", str(tmp_path / "a" / "identity.key")).stdout.strip() == a_info["peer_id"]
        )
    finally:
        stop(a)
        if b is not None:
            stop(b)


def test_sigterm_shuts_down_within_2s(tmp_path):
    proc, info = start_daemon(tmp_path, "a")
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert time.monotonic() - start < 2.0
    assert not os.path.exists(info["control"])


def test_stop_command(tmp_path):
    proc, info = start_daemon(tmp_path, "a")
    assert run_cli("stop", "--control", info["control"]).returncode == 0
    assert proc.wait(5) == 0


def test_bad_input_gives_one_line_errors(tmp_path):
    assert_one_line_error(run_cli("run", "--listen", "/ip4/1.2.3/tcp/1", "--data-dir", str(tmp_path / "x")))
    key = tmp_path / "open.key"
    run_cli("id", "--key", str(key))  # missing key: error, not created
    assert not key.exists()
    assert_one_line_error(run_cli("id", "--key", str(key)))
    from lattice.identity import load_or_create_key

    load_or_create_key(key)
    key.chmod(0o644)
    assert_one_line_error(
        run_cli(
            "run", "--key", str(key), "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir", str(tmp_path / "y")
        )
    )
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"garbage")
    garbage.chmod(0o600)
    assert_one_line_error(run_cli("id", "--key", str(garbage)))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("run", "--listen", f"/ip4/127.0.0.1/tcp/{port}", "--data-dir", str(tmp_path / "z"))
        assert_one_line_error(result)
        assert "address already in use" in result.stderr.lower() or "in use" in result.stderr
    assert_one_line_error(run_cli("peers", "--control", str(tmp_path / "nothing.sock")))
    assert_one_line_error(
        run_cli("ping", "/ip4/999.1.1.1/tcp/1", "--control", str(tmp_path / "nothing.sock"))
    )
    assert_one_line_error(run_cli("frobnicate"))
    assert_one_line_error(run_cli("ping"))


@pytest.mark.parametrize("cmd", [["--help"], ["run", "--help"], ["peers", "--help"], ["ping", "--help"]])
def test_help_everywhere(cmd):
    result = run_cli(*cmd)
    assert result.returncode == 0 and "usage" in result.stdout


def test_dht_commands_between_two_daemons(tmp_path):
    a, a_info = start_daemon(tmp_path, "a")
    b = None
    try:
        b, b_info = start_daemon(tmp_path, "b", "--bootstrap", a_info["addrs"][0])
        put = run_cli(
            "dht", "put", "greeting", "hello swarm", "--ttl", "60", "--json", "--control", a_info["control"]
        )
        assert put.returncode == 0 and json.loads(put.stdout)["replicas"] >= 1, put.stderr
        got = run_cli("dht", "get", "greeting", "--json", "--control", b_info["control"])
        rows = json.loads(got.stdout)
        assert rows[0]["value"] == "hello swarm" and rows[0]["publisher"] == a_info["peer_id"]
        assert run_cli("dht", "provide", "dataset:fmnist", "--control", b_info["control"]).returncode == 0
        found = json.loads(run_cli("dht", "providers", "dataset:fmnist", "--json", "--control",
                                   a_info["control"]).stdout)  # fmt: skip
        assert [p for p, _ in found] == [b_info["peer_id"]]
        assert_one_line_error(run_cli("dht", "put", "k", "v", "--ttl", "-1", "--control", a_info["control"]))
        big = run_cli("dht", "put", "k", "x" * 70000, "--control", a_info["control"])
        assert_one_line_error(big)
        assert "over the limit" in big.stderr
    finally:
        stop(a)
        if b is not None:
            stop(b)


def test_rpc_commands(tmp_path):
    a, a_info = start_daemon(tmp_path, "a", "--enable-bench")
    b = None
    try:
        b, b_info = start_daemon(tmp_path, "b", "--enable-bench")
        methods = run_cli("rpc", "methods", "--json", "--control", a_info["control"])
        assert "lattice.bench.echo" in json.loads(methods.stdout)
        echo = run_cli("rpc", "call", b_info["addrs"][0], "lattice.bench.echo", '{"x": [1, 2]}', "--json",
                       "--control", a_info["control"])  # fmt: skip
        assert json.loads(echo.stdout) == {"x": [1, 2]}, echo.stderr
        src = run_cli(
            "rpc", "call", b_info["peer_id"], "lattice.bench.source", "1024", "--control", a_info["control"]
        )
        assert json.loads(src.stdout) == {"tensor": "float32", "shape": [256]}, src.stderr
        bench = run_cli("rpc", "bench", b_info["peer_id"], "--size", "4MiB", "--count", "3", "--json",
                        "--control", a_info["control"])  # fmt: skip
        assert json.loads(bench.stdout)["mib_per_s"] > 0, bench.stderr
        assert_one_line_error(
            run_cli("rpc", "bench", b_info["peer_id"], "--size", "lots", "--control", a_info["control"])
        )
        assert_one_line_error(
            run_cli("rpc", "call", b_info["peer_id"], "x", "{bad json", "--control", a_info["control"])
        )
        missing = run_cli("rpc", "call", b_info["peer_id"], "no.such", "--control", a_info["control"])
        assert_one_line_error(missing)
        assert "no method" in missing.stderr
    finally:
        stop(a)
        if b is not None:
            stop(b)


def test_send_tensor_into_a_peers_inbox(tmp_path):
    import numpy as np

    a, a_info = start_daemon(tmp_path, "a")
    b, b_info = start_daemon(tmp_path, "b", "--inbox")
    try:
        tensor = np.arange(3 * 1024 * 1024, dtype=np.float32).reshape(1024, 3072)[:, ::3]  # not contiguous
        path = tmp_path / "weights.npy"
        np.save(path, tensor)
        ctl = ["--control", a_info["control"]]
        result = run_cli("send-tensor", b_info["addrs"][0], str(path), *ctl, "--json", timeout=60)
        assert result.returncode == 0, result.stderr
        reply = json.loads(result.stdout)
        assert "/" not in reply["file"] and reply["file"].endswith("-weights.npy")  # no local path
        saved = np.load(tmp_path / "b" / "inbox" / reply["file"], allow_pickle=False)
        assert np.array_equal(saved, tensor) and reply["bytes"] == tensor.nbytes
        # a name that tries to leave the inbox, a pickled file, a missing file: one-line errors
        bad = run_cli("send-tensor", b_info["peer_id"], str(path), "--name", "../../etc/x", *ctl)
        assert_one_line_error(bad)
        pickled = tmp_path / "obj.npy"
        np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        assert_one_line_error(run_cli("send-tensor", b_info["peer_id"], str(pickled), *ctl))
        assert_one_line_error(run_cli("send-tensor", b_info["peer_id"], str(tmp_path / "nope.npy"), *ctl))
        # a peer without --inbox says so
        no_inbox = run_cli("send-tensor", a_info["addrs"][0], str(path), "--control", b_info["control"])
        assert no_inbox.returncode != 0 and "inbox" in (no_inbox.stderr + no_inbox.stdout).lower()
    finally:
        stop(a)
        stop(b)


def test_crdt_set_on_one_daemon_is_read_on_another(tmp_path):
    a, a_info = start_daemon(tmp_path, "a")
    b, b_info = start_daemon(tmp_path, "b", "--bootstrap", a_info["addrs"][0])
    try:
        for info in (a_info, b_info):  # both open the document (so both replicate it)
            assert run_cli("crdt", "get", "swarm/config", "--control", info["control"]).returncode == 0
        res = run_cli("crdt", "set", "swarm/config", "lr", "0.05", "--control", a_info["control"])
        assert res.returncode == 0, res.stderr
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            got = run_cli("crdt", "get", "swarm/config", "--json", "--control", b_info["control"])
            if got.returncode == 0 and json.loads(got.stdout).get("lr") == 0.05:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the write did not reach b: {got.stdout} {got.stderr}")
    finally:
        stop(a)
        stop(b)


def test_crdt_watch_prints_changes_as_they_arrive(tmp_path):
    a, a_info = start_daemon(tmp_path, "a")
    try:
        ctl = ["--control", a_info["control"]]
        watcher = subprocess.Popen(
            [*CLI, "crdt", "watch", "notes", "--count", "2", "--json", *ctl],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(60):  # keep writing until the watcher has seen two changes (it may start late)
            assert run_cli("crdt", "set", "notes", f"k{i}", str(i), *ctl).returncode == 0
            if watcher.poll() is not None:
                break
            time.sleep(0.2)
        out, err = watcher.communicate(timeout=20)
        lines = [json.loads(line) for line in out.splitlines()]
        assert watcher.returncode == 0, err
        first, second = lines
        assert second["seq"] == first["seq"] + 1 and len(second["map"]) == len(first["map"]) + 1
    finally:
        stop(a)
