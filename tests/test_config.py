import pytest

from lattice.config import NodeConfig
from lattice.errors import ConfigError


def test_precedence_defaults_file_env_overrides(tmp_path):
    cfg_file = tmp_path / "node.toml"
    cfg_file.write_text(
        '[node]\nlisten = ["/ip4/127.0.0.1/tcp/4001"]\nmax_connections = 10\nlog_level = "debug"\n'
    )
    env = {"LATTICE_MAX_CONNECTIONS": "20", "LATTICE_DATA_DIR": str(tmp_path / "env")}
    cfg = NodeConfig.load(cfg_file, env=env, log_level="warning")
    assert cfg.listen == ("/ip4/127.0.0.1/tcp/4001",)  # file
    assert cfg.max_connections == 20  # env beats file
    assert cfg.log_level == "warning"  # override beats file
    assert cfg.data_dir == tmp_path / "env"
    assert cfg.key_path == tmp_path / "env" / "identity.key"
    assert cfg.control_path == tmp_path / "env" / "control.sock"
    assert NodeConfig.load(env={}).keepalive_interval == 30.0  # defaults


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"listen": ["/ip4/1.2.3/tcp/1"]}, "invalid multiaddr"),
        ({"listen": ["/ip4/127.0.0.1/udp/1"]}, "cannot listen"),
        ({"bootstrap": ["not-an-addr"]}, "invalid multiaddr"),
        ({"max_connections": 0}, "max_connections"),
        ({"log_level": "loud"}, "log_level"),
        ({"bogus": 1}, "unknown config keys"),
        ({"control_socket": "/tmp/" + "x" * 200}, "longer than"),
        ({"read_lowat_max": -1}, "read_lowat_max"),
    ],
)
def test_invalid_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        NodeConfig.load(env={}, **kwargs)


def test_bad_files_and_env(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        NodeConfig.load(tmp_path / "nope.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        NodeConfig.load(bad, env={})
    with pytest.raises(ConfigError, match="LATTICE_MAX_CONNECTIONS"):
        NodeConfig.load(env={"LATTICE_MAX_CONNECTIONS": "many"})


def test_env_lists():
    cfg = NodeConfig.load(env={"LATTICE_LISTEN": "/ip4/127.0.0.1/tcp/1, /ip4/127.0.0.1/tcp/2"})
    assert cfg.listen == ("/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/2")
