"""The plug-in door (lattice.plugins): the apps pyproject.toml declares load without torch and add their
commands; every node command takes the same node options; apps enabled in the config are looked up
when the node is built; a broken plug-in leaves the node's own commands working; gossip SGD runs as
`lattice-node gossip-sgd`."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from lattice.config import NodeConfig
from lattice.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "lattice.cli"]
HELLO = ROOT / "examples" / "hello_app" / "src"


def declared_apps() -> dict[str, str]:
    """name -> "module:attribute" of the lattice.apps entry points in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["entry-points"]["lattice.apps"]


def require_installed_metadata() -> None:
    """Subprocess tests find apps through the installed metadata, which pip writes at install time."""
    installed = {ep.name for ep in entry_points(group="lattice.apps")}
    missing = set(declared_apps()) - installed
    if missing:
        pytest.fail(
            f"apps {sorted(missing)} are declared in pyproject.toml but not installed: the package "
            "metadata is stale; reinstall with `pip install --no-deps -e .`"
        )


def test_declared_apps_load_and_list_their_commands_without_torch():
    """What `lattice-node --help` pays: the plug-in modules and their parsers, never torch."""
    code = textwrap.dedent(f"""
        import argparse, importlib, json, sys
        from lattice.plugins import App
        out = {{}}
        for name, target in {declared_apps()!r}.items():
            module, _, attr = target.partition(":")
            app = getattr(importlib.import_module(module), attr)
            assert isinstance(app, App) and app.name == name, (name, app)
            sub = argparse.ArgumentParser().add_subparsers()
            commands = {{}}
            app.add_commands(sub, commands)
            out[name] = sorted(commands)
        print(json.dumps({{"apps": out, "torch": "torch" in sys.modules}}))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    mesh = ["generate", "pack-model", "serve-api", "serve-model"]
    assert report["apps"] == {"gossip_sgd": ["gossip-sgd"], "mesh_inference": mesh}
    assert report["torch"] is False


NODE_ARGS = [
    "--listen", "/ip4/127.0.0.1/tcp/4001", "--bootstrap", "/ip4/127.0.0.1/tcp/4002/p2p/"
    "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA", "--key", "/tmp/k.key", "--data-dir", "/tmp/d",
    "--control", "/tmp/d/c.sock", "--max-memory", "1GiB", "--max-connections", "64", "--app", "hello",
    "--reachability", "private", "--no-hole-punching", "--log-format", "json", "--log-level", "debug",
    "--metrics-listen", "127.0.0.1:9999", "--join", "default", "--relay",
]  # fmt: skip


def test_every_node_command_takes_the_same_node_options(monkeypatch):
    """run, serve-model, gossip-sgd peer and the example app's command: one set of node options, one
    NodeConfig (serve-model used to re-declare 8 of them and lacked the rest)."""
    sys.path.insert(0, str(HELLO))
    try:
        from lattice_hello.plugin import APP as HELLO_APP
    finally:
        sys.path.remove(str(HELLO))
    from lattice.apps.gossip_sgd.cli import APP as GOSSIP_APP
    from lattice.apps.mesh_inference.cli import APP as MESH_APP
    from lattice.cli import build_parser, node_config

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    for app in (GOSSIP_APP, MESH_APP, HELLO_APP):
        app.add_commands(sub, {})
    for name in [k for k in os.environ if k.startswith("LATTICE_")]:
        monkeypatch.delenv(name)
    configs = [
        node_config(build_parser(with_apps=False).parse_args(["run", *NODE_ARGS])),
        node_config(parser.parse_args(["serve-model", *NODE_ARGS])),
        node_config(parser.parse_args(["gossip-sgd", "peer", "--run", "r", "--out", "/tmp/o", *NODE_ARGS])),
        node_config(parser.parse_args(["hello", "/ip4/127.0.0.1/tcp/1", *NODE_ARGS])),
    ]
    assert all(c == configs[0] for c in configs[1:])
    c = configs[0]
    assert (c.max_memory, c.apps, c.reachability) == (1 << 30, ("hello",), "private")
    assert (c.hole_punching, c.relay, c.log_format) == (False, True, "json")
    assert c.control_path == Path("/tmp/d/c.sock") and c.metrics_listen == "127.0.0.1:9999"


def test_node_config_layers_a_commands_defaults_under_file_env_and_flags(tmp_path):
    from lattice.cli import add_node_options, node_config

    parser = argparse.ArgumentParser()
    add_node_options(parser)
    defaults = {"listen": ["/ip4/127.0.0.1/tcp/0"], "data_dir": tmp_path / "cmd", "control": False}
    cfg = node_config(parser.parse_args([]), **defaults)
    assert (cfg.listen, cfg.data_dir, cfg.control_path) == (("/ip4/127.0.0.1/tcp/0",), tmp_path / "cmd", None)
    conf = tmp_path / "node.toml"
    conf.write_text(
        f'listen = ["/ip4/127.0.0.1/tcp/7"]\napps = ["hello", "other"]\ndata_dir = "{tmp_path}/f"\n'
    )
    cfg = node_config(
        parser.parse_args(["--config", str(conf), "--control", str(tmp_path / "c.sock")]), **defaults
    )
    assert (
        cfg.listen == ("/ip4/127.0.0.1/tcp/7",) and cfg.data_dir == tmp_path / "f"
    )  # the file beats defaults
    assert cfg.apps == ("hello", "other")
    assert cfg.control_path == tmp_path / "c.sock"  # a socket given is a socket served
    cfg = node_config(parser.parse_args(["--config", str(conf), "--app", "x"]), **defaults)
    assert cfg.apps == ("x",)  # the flag replaces the file's list


@pytest.mark.parametrize("apps", ["hello", ["../evil"], [""], [3], ["a" * 65]])
def test_bad_app_names_are_config_errors(apps):
    with pytest.raises(ConfigError, match="app"):
        NodeConfig.load(env={}, apps=apps)


def test_apps_from_the_environment():
    assert NodeConfig.load(env={"LATTICE_APPS": "hello, other,hello"}).apps == ("hello", "other")


def test_an_app_that_is_missing_or_has_no_services_is_a_clear_error(tmp_path):
    from lattice.plugins import build_node

    base = {"data_dir": tmp_path, "control": False}
    with pytest.raises(
        ConfigError, match=r"app 'no-such-app' is not installed \(installed apps: .*mesh_inference"
    ):
        build_node(NodeConfig(apps=("no-such-app",), **base))
    with pytest.raises(ConfigError, match="'mesh_inference' has no services to run in a node"):
        build_node(NodeConfig(apps=("mesh_inference",), **base))
    assert "hello" not in build_node(NodeConfig(**base)).services  # nothing runs unless enabled


def test_a_broken_plugin_leaves_the_node_commands_working(tmp_path):
    """An installed app whose module fails to import: a warning, and every other command works."""
    dist = tmp_path / "broken_app-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-app\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[lattice.apps]\nbroken = no_such_module.plugin:APP\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.environ.get("PYTHONPATH", ""), str(tmp_path)])}
    result = subprocess.run([*CLI, "--help"], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0 and "serve-model" in result.stdout
    assert "warning: app 'broken' (no_such_module.plugin:APP) failed to load" in result.stderr
    result = subprocess.run([*CLI, "run", "--app", "broken", "--data-dir", str(tmp_path / "d")],
                            capture_output=True, text=True, env=env, timeout=30)  # fmt: skip
    assert result.returncode == 2 and "app 'broken' is installed but failed to load" in result.stderr
    assert "Traceback" not in result.stderr


def test_gossip_sgd_is_a_lattice_node_command_with_the_same_options():
    require_installed_metadata()
    ours = subprocess.run([*CLI, "gossip-sgd", "peer", "--help"], capture_output=True, text=True, timeout=30)
    standalone = subprocess.run([sys.executable, "-m", "lattice.apps.gossip_sgd", "peer", "--help"],
                                capture_output=True, text=True, timeout=30)  # fmt: skip
    assert ours.returncode == 0 and standalone.returncode == 0, ours.stderr + standalone.stderr
    options = [sorted(set(re.findall(r"--[a-z][a-z-]*", r.stdout))) for r in (ours, standalone)]
    assert options[0] == options[1] and {"--run", "--join", "--data-dir", "--set"} <= set(options[0])
    bad = subprocess.run(
        [*CLI, "gossip-sgd", "sim", "--set", "nope=1"], capture_output=True, text=True, timeout=60
    )
    assert (
        bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown hyper-parameter 'nope'" in bad.stderr
    )


@pytest.mark.usefixtures("fashion_mnist")
def test_two_gossip_sgd_peers_through_lattice_node(tmp_path):
    """The plug-in end to end: two `lattice-node gossip-sgd peer` processes train a round together,
    and the node options apply (the first keeps its node's state in --data-dir)."""
    require_installed_metadata()
    common = ["gossip-sgd", "peer", "--run", "t", "--peers", "2", "--rounds", "1", "--train-limit", "600",
              "--test-limit", "200", "--eval-every", "1", "--set", "local_steps=1", "--wait", "30",
              "--timeout", "10", "--linger", "5"]  # fmt: skip
    first = subprocess.Popen(
        [*CLI, *common, "--out", str(tmp_path / "p0"), "--addr-file", str(tmp_path / "addr"),
         "--data-dir", str(tmp_path / "node0")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        from lattice.testing.daemons import wait_for

        addr = wait_for(lambda: (tmp_path / "addr").exists() and (tmp_path / "addr").read_text().strip(), 30,
                        "the first peer's address")  # fmt: skip
        second = subprocess.run(
            [*CLI, *common, "--out", str(tmp_path / "p1"), "--bootstrap", addr],
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert second.returncode == 0, second.stderr[-3000:]
        assert first.wait(60) == 0, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    from lattice.identity import load_or_create_key

    key = load_or_create_key(tmp_path / "node0" / "identity.key", create=False)
    assert not (tmp_path / "p0" / "node").exists() and (tmp_path / "p1" / "node" / "identity.key").exists()
    for peer in ("p0", "p1"):
        records = [json.loads(line) for line in (tmp_path / peer / "log.jsonl").read_text().splitlines()]
        assert [r["event"] for r in records] == ["start", "round", "done", "average"]
        assert records[1]["live"] == 2 and records[2]["timeouts"] == 0 and records[2]["bytes_sent"] > 0
        assert (tmp_path / peer / "model.safetensors").exists()
        if peer == "p0":
            assert records[0]["peer"] == str(key.peer_id)
