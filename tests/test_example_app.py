"""The third-party example app (examples/hello_app), installed with pip into a temporary directory (not
globally): lattice-node finds it like its own apps, a daemon started with `--app hello` (or with
``apps = ["hello"]`` in its config file) serves its RPC method, control op and dashboard panel, its
`lattice-node hello` command calls the method, and hostile greetings are refused while honest ones
are still served."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lattice.testing.daemons import start_daemon

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "lattice.cli"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """`pip install --no-deps --target SITE examples/hello_app` (from a copy: the build writes files)."""
    tmp = tmp_path_factory.mktemp("hello")
    source = shutil.copytree(ROOT / "examples" / "hello_app", tmp / "src")
    target = tmp / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return target


@pytest.fixture
def with_app(site, monkeypatch) -> dict:
    """This process's children (lattice-node, daemons) see the installed example app."""
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(site)) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    return {**os.environ, "PYTHONPATH": path}


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=60)


def test_the_example_app_is_found_like_the_built_in_ones(with_app):
    listed = subprocess.run(
        [sys.executable, "-c", "import json; from lattice.plugins import App, installed_apps as a; "
         "print(json.dumps({x.name: [type(x) is App, x.add_commands is not None] for x in a()}))"],
        capture_output=True, text=True, env=with_app, timeout=30,
    )  # fmt: skip
    apps = json.loads(listed.stdout)
    assert apps["hello"] == apps["mesh_inference"] == [True, True], listed.stderr
    usage = cli(with_app, "--help")
    assert usage.returncode == 0 and "hello" in usage.stdout and "serve-model" in usage.stdout
    hello = cli(with_app, "hello", "--help")  # the node options, from the same public helper as `run`
    assert hello.returncode == 0 and all(o in hello.stdout for o in ("--join", "--bootstrap", "--app"))


def test_a_daemon_serves_the_installed_app_and_refuses_bad_greetings(with_app, tmp_path):
    config = tmp_path / "b.toml"
    config.write_text('apps = ["hello"]\n')
    a = start_daemon(tmp_path, "a", ["--listen", "/ip4/127.0.0.1/tcp/0", "--app", "hello"])
    b = start_daemon(tmp_path, "b", ["--listen", "/ip4/127.0.0.1/tcp/0", "--config", str(config)])
    plain = start_daemon(tmp_path, "plain", ["--listen", "/ip4/127.0.0.1/tcp/0"])
    try:
        greeting = cli(with_app, "hello", a.info["addrs"][0], "--name", "Ada")
        assert greeting.returncode == 0, greeting.stderr
        assert greeting.stdout.strip() == f"hello, Ada! (from {a.peer_id})"
        assert "hello.greet" in a.call("rpc.methods") and "hello" in a.call("status")["services"]
        # b enabled the app in its config file; b's node calls a's method as any peer would
        assert "hello.greet" in b.call("rpc.methods")
        reply = b.call("rpc.call", peer=a.info["addrs"][0], method="hello.greet", payload={"name": "Bo"})
        assert reply == {"greeting": "hello, Bo!", "from": a.peer_id, "to": b.peer_id}
        # hostile greetings: refused with one line each, nothing stored or echoed
        for payload in (None, [1], {"name": 5}, {"name": ""}, {"name": "x" * 65}, {"name": "\x1b[2J"},
                        {"name": "x" * 60_000}):  # fmt: skip
            with pytest.raises(Exception, match="BadGreeting: expected"):
                b.call("rpc.call", peer=a.peer_id, method="hello.greet", payload=payload)
        bad = cli(with_app, "hello", a.info["addrs"][0], "--name", "x" * 65)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "BadGreeting" in bad.stderr
        assert "Traceback" not in bad.stderr
        # honest callers are still served, and the operator sees what happened
        again = b.call("rpc.call", peer=a.peer_id, method="hello.greet", payload={"name": "Cy"})
        assert again["greeting"] == "hello, Cy!"
        assert a.call("hello.stats") == {"greeted": 3, "refused": 8}
        panel = next(p for p in a.call("metrics")["panels"] if p["name"] == "hello")
        assert [y for _, y in panel["series"]["greetings"]] == [1, 2, 3]
        # a node that did not enable the app does not serve it
        assert "hello.greet" not in plain.call("rpc.methods")
        with pytest.raises(Exception, match="no method"):
            b.call("rpc.call", peer=plain.info["addrs"][0], method="hello.greet", payload={"name": "Di"})
    finally:
        for daemon in (a, b, plain):
            daemon.stop()
