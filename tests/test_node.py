"""The Node (async and blocking facade) and its control API, in one process."""

from __future__ import annotations

import os
import socket
import struct

import pytest
import trio

from lattice import Client, Node, NodeConfig, RemoteError
from lattice.errors import ConfigError, ControlError, NodeError


def _config(tmp_path, name, **kw):
    return NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / name, **kw)


async def test_two_nodes_connect_ping_and_list_peers(tmp_path):
    async with (
        Node(_config(tmp_path, "a", control=False)) as a,
        Node(_config(tmp_path, "b", control=False)) as b,
    ):
        peer = await b.connect(a.addrs[0])
        assert peer == str(a.peer_id)
        rtts = await b.ping(peer, count=3)
        assert len(rtts) == 3
        peers = await b.peers()
        assert [p["peer_id"] for p in peers] == [str(a.peer_id)]
        with trio.fail_after(5):
            while not (await a.peers()) or not (await a.peers())[0]["agent"]:
                await trio.sleep(0.01)
        status = await a.status()
        assert status["peers"] == 1 and status["peer_id"] == str(a.peer_id)


async def test_node_keeps_identity_across_restarts(tmp_path):
    cfg = _config(tmp_path, "a", control=False)
    async with Node(cfg) as n:
        first = n.peer_id
    async with Node(cfg) as n:
        assert n.peer_id == first
    assert ((tmp_path / "a" / "identity.key").stat().st_mode & 0o777) == 0o600


async def test_bootstrap_reconnects_with_backoff(tmp_path):
    async with Node(_config(tmp_path, "a", control=False)) as a:
        addr = a.addrs[0]
        cfg = _config(tmp_path, "b", control=False, bootstrap=[addr])
        async with Node(cfg) as b:
            with trio.fail_after(5):
                while a.peer_id not in b.host.connected_peers():
                    await trio.sleep(0.02)
            await b.host.disconnect(a.peer_id)  # drop it: the manager re-dials
            with trio.fail_after(5):
                while a.peer_id not in b.host.connected_peers():
                    await trio.sleep(0.02)


def test_blocking_facade_same_names(tmp_path):
    a = Node.start(_config(tmp_path, "a", control=False))
    b = Node.start(_config(tmp_path, "b", control=False))
    try:
        assert b.connect(a.addrs[0]) == str(a.peer_id)
        assert len(b.ping(str(a.peer_id), count=2)) == 2
        assert b.peers()[0]["peer_id"] == str(a.peer_id)
        assert b.status()["peers"] == 1
        assert b.id()["peer_id"] == str(b.peer_id)
    finally:
        a.close()
        b.close()
    with pytest.raises(NodeError):
        a.peers()


def test_one_remote_error_for_peers_and_daemons(tmp_path):
    """A handler's error on a peer and a daemon's failed operation are both lattice.RemoteError
    (the first also an RPCError, the second a ControlError), and a peer's error seen through the
    daemon keeps the type the peer reported. Also: the status pages compose Host.stats/peer_stats."""
    from lattice.rpc import RPCError

    node = Node.start(_config(tmp_path, "a"))
    other = Node.start(_config(tmp_path, "b", control=False))

    def refuse(payload):
        raise ValueError(f"no good: {payload}")

    other.rpc.register("refuse", refuse)
    try:
        node.connect(other.addrs[0])
        with pytest.raises(RemoteError) as direct:
            node.rpc.call(str(other.peer_id), "refuse", 1)
        assert isinstance(direct.value, RPCError) and direct.value.type == "ValueError"
        assert direct.value.remote_message == "no good: 1"
        with Client(tmp_path / "a" / "control.sock") as client:
            with pytest.raises(RemoteError) as through:
                client.rpc.call(str(other.peer_id), "refuse", 2)
            assert isinstance(through.value, ControlError) and through.value.type == "ValueError"
            assert str(through.value) == "ValueError: no good: 2"
            with pytest.raises(RemoteError) as failed:
                client.connect("/ip4/127.0.0.1/tcp/1")
            assert isinstance(failed.value, ControlError) and failed.value.type == "DialError"
            (row,) = client.peers()
            assert row["peer_id"] == str(other.peer_id) and row["bytes_in"] > 0 and row["bytes_out"] > 0
            status = client.status()
            assert status["paths"] == {str(other.peer_id): "direct"} and status["bytes_sent"] > 0
    finally:
        node.close()
        other.close()


def test_blocking_start_reports_errors(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(Exception, match="cannot listen"):
            Node.start(
                NodeConfig(listen=[f"/ip4/127.0.0.1/tcp/{port}"], data_dir=tmp_path / "x", control=False)
            )


def test_control_api_through_client(tmp_path):
    node = Node.start(_config(tmp_path, "a"))
    other = Node.start(_config(tmp_path, "b", control=False))
    sock_path = tmp_path / "a" / "control.sock"
    try:
        assert (sock_path.stat().st_mode & 0o777) == 0o600
        with Client(sock_path) as client:
            assert client.id()["peer_id"] == str(node.peer_id)
            assert client.connect(other.addrs[0]) == str(other.peer_id)
            assert client.peers()[0]["peer_id"] == str(other.peer_id)
            assert len(client.ping(other.addrs[0], count=2)) == 2
            with pytest.raises(RemoteError, match="unknown operation"):
                client.call("no-such-op")
            with pytest.raises(RemoteError) as err:
                client.connect("/ip4/127.0.0.1/tcp/1")
            assert err.value.type == "DialError"
            with pytest.raises(RemoteError, match="bad arguments"):
                client.call("ping", nonsense=1)
        # garbage and an oversized frame on the socket: the daemon survives
        junk_frames = (
            os.urandom(64),
            struct.pack(">Q", 2**40) + b"x",  # over the size limit: refused before allocating
            struct.pack(">QI", 7, 3) + b"\xc1\xc1\xc1",  # invalid msgpack
            struct.pack(">QI", 6, 9) + b"\x80\x80",  # document overruns the frame
        )
        for junk in junk_frames:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock_path))
                s.sendall(junk)
        with Client(sock_path) as client:
            assert client.status()["peers"] == 1
        # a second daemon cannot steal a live control socket
        with pytest.raises(ConfigError, match="in use"):
            Node.start(
                NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / "c", control_socket=sock_path)
            )
    finally:
        node.close()
        other.close()
    assert not sock_path.exists()


def test_client_without_daemon(tmp_path):
    with pytest.raises(ControlError, match="no daemon is listening"):
        Client(tmp_path / "missing.sock")
