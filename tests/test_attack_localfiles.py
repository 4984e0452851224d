"""Local files (issue 16, defect 15), against real `lattice-node run` processes: directories and
files planted by another local user, and a remote peer filling the tensor inbox."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from attacks.local_files import fill_inbox, plant_symlink
from lattice.identity import KeyPair
from lattice.testing.daemons import start_daemon

CLI = [sys.executable, "-m", "lattice.cli"]
LISTEN = ["--listen", "/ip4/127.0.0.1/tcp/0"]


def run_briefly(*args: str, timeout: float = 15.0) -> subprocess.CompletedProcess:
    """Run the CLI; a daemon that starts instead of refusing is killed (returncode None)."""
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return subprocess.CompletedProcess(proc.args, None, out, err)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_refused(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lattice-node: error:"), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_dir_problem():
    from lattice._files import dir_problem

    d = stat.S_IFDIR
    assert dir_problem(d | 0o700, 1000, 1000) is None and dir_problem(d | 0o755, 0, 1000) is None
    assert "writable by group/others (mode 777)" in dir_problem(d | 0o777, 1000, 1000)
    assert "writable by group/others" in dir_problem(d | 0o770, 1000, 1000)
    assert "writable by group/others (mode 1777)" in dir_problem(d | 0o1777, 0, 1000)  # /tmp
    assert "owned by uid 1001" in dir_problem(d | 0o700, 1001, 1000)
    assert "not a directory" in dir_problem(stat.S_IFREG | 0o600, 1000, 1000)


def test_inbox_room_problem():
    from lattice.rpc.inbox import InboxLimits, room_problem

    limits = InboxLimits(max_files=5, max_bytes=1000, max_files_per_peer=2, max_bytes_per_peer=500)
    listing = {"aaaa-x.npy": 100, "aaaa-y.npy": 100, "bbbb-z.npy": 300}
    assert "2 files per peer" in room_problem(listing, "aaaa-new.npy", "aaaa-", 1, limits)
    assert room_problem(listing, "aaaa-x.npy", "aaaa-", 400, limits) is None  # replaces x: frees 100
    assert "500 bytes per peer" in room_problem(listing, "bbbb-w.npy", "bbbb-", 201, limits)
    assert room_problem(listing, "cccc-w.npy", "cccc-", 500, limits) is None
    listing["dddd-q.npy"] = 400
    assert "the inbox is full (limit 1000 bytes)" in room_problem(listing, "cccc-w.npy", "cccc-", 200, limits)
    listing["eeee-q.npy"] = 0
    assert "the inbox is full (limit 5 files)" in room_problem(listing, "cccc-w.npy", "cccc-", 1, limits)


def test_a_data_dir_others_can_write_is_refused(tmp_path):
    data = tmp_path / "shared"
    data.mkdir()
    data.chmod(0o777)  # another local user could swap the control socket or plant the key
    assert_refused(run_briefly("run", *LISTEN, "--data-dir", str(data)), "writable by group/others")
    assert sorted(os.listdir(data)) == []  # nothing created in it: no key, no socket
    keys = tmp_path / "keys"
    keys.mkdir()
    keys.chmod(0o775)  # group-writable key directory
    result = run_briefly("run", *LISTEN, "--data-dir", str(tmp_path / "d"), "--key", str(keys / "id.key"))
    assert_refused(result, "key directory", "writable by group/others")
    assert not (keys / "id.key").exists()
    fresh = tmp_path / "fresh-data"  # a data dir the daemon creates itself is private
    start_daemon(tmp_path, "fresh", [*LISTEN, "--data-dir", str(fresh)]).stop()
    assert fresh.stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory to another user")
def test_a_data_dir_owned_by_another_user_is_refused(tmp_path):
    data = tmp_path / "theirs"
    data.mkdir(mode=0o700)
    os.chown(data, 65534, 65534)
    assert_refused(run_briefly("run", *LISTEN, "--data-dir", str(data)), "owned by uid 65534")


def test_control_naming_a_regular_file_is_refused_and_the_file_kept(tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("precious")
    result = run_briefly("run", *LISTEN, "--data-dir", str(tmp_path / "d"), "--control", str(precious))
    assert_refused(result, "not a socket")
    assert precious.read_text() == "precious"


def test_a_symlink_at_the_ready_file_temp_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    ready = tmp_path / "ready.json"
    # the old temp name was "<ready>.<pid>.tmp": the attacker predicts the pid (here: plants it for
    # the daemon's own pid, from inside the process, before the daemon starts)
    plant = f"import os; os.symlink({str(victim)!r}, {str(ready)!r} + f'.{{os.getpid()}}.tmp')"
    script = f"{plant}; import sys; from lattice.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", script, "run", *LISTEN, "--data-dir", str(tmp_path / "d"),
            "--ready-file", str(ready)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.exists(), proc.stderr.read() if proc.poll() is not None else "not ready"
        assert not ready.is_symlink() and json.loads(ready.read_text())["peer_id"]
        assert victim.read_text() == "precious"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_a_symlink_at_the_inbox_part_name_is_not_followed(tmp_path):
    daemon = start_daemon(tmp_path, "victim", [*LISTEN, "--inbox"])
    try:
        victim = tmp_path / "victim.txt"
        victim.write_text("precious")
        sender = KeyPair.generate()
        inbox = tmp_path / "victim" / "inbox"
        stored = inbox / f"{sender.peer_id.short()}-w0.npy"
        plant_symlink(inbox / f".{stored.name}.part", victim)  # the old, predictable .part name
        result = await fill_inbox(daemon.info["addrs"][0], tmp_path / "sender", 1, 4096, "w", sender)
        assert result["stored"] == 1, result
        assert victim.read_text() == "precious"
        assert stored.is_file() and not stored.is_symlink()
        assert np.load(stored, allow_pickle=False).nbytes == 4096
    finally:
        daemon.stop()


async def test_inbox_caps_refuse_the_flooder_and_keep_serving_honest_senders(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text(
        "[node]\ninbox_max_files = 6\ninbox_max_bytes = 1048576\n"
        "inbox_max_files_per_peer = 3\ninbox_max_bytes_per_peer = 262144\n"
    )
    daemon = start_daemon(tmp_path, "victim", [*LISTEN, "--inbox", "--config", str(config)])
    addr = daemon.info["addrs"][0]
    try:
        flood = await fill_inbox(addr, tmp_path / "flooder", 50, 1024, "junk")
        assert flood["stored"] == 3 and "inbox" in flood["error"] and "3 files" in flood["error"], flood
        big = await fill_inbox(addr, tmp_path / "big", 1, 300_000, "big")
        assert big["stored"] == 0 and "262144 bytes" in big["error"], big
        honest = await fill_inbox(addr, tmp_path / "honest", 1, 1024, "weights")
        assert honest["stored"] == 1, honest
        reply = honest["replies"][0]
        assert reply["file"].endswith("-weights0.npy") and "/" not in json.dumps(reply)  # no local path
        for i in range(2):  # two more senders fill the node-wide cap of 6 files
            await fill_inbox(addr, tmp_path / f"other{i}", 1, 1024, "x")
        late = await fill_inbox(addr, tmp_path / "late", 1, 1024, "late")
        assert late["stored"] == 0 and "inbox is full" in late["error"] and "6 files" in late["error"], late
        assert len(list((tmp_path / "victim" / "inbox").glob("*.npy"))) == 6
        assert daemon.call("status")["peers"] >= 0  # the daemon is alive and serving
    finally:
        daemon.stop()
