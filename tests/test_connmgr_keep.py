"""ConnectionManager.keep: a kept peer that went away is re-dialed within about a second."""

from __future__ import annotations

import socket
import time

from lattice import Node, NodeConfig
from lattice.identity import KeyPair


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_kept_peer_is_redialed_after_it_restarts(tmp_path):
    port = _free_port()
    key = KeyPair.generate()

    def start_a() -> object:
        cfg = NodeConfig(listen=[f"/ip4/127.0.0.1/tcp/{port}"], data_dir=tmp_path / "a", control=False)
        return Node.start(cfg, keypair=key)

    a = start_a()
    b = Node.start(NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / "b", control=False))
    try:
        b.connect(a.addrs[0])
        assert b.run(_keep, b.node, key.peer_id)
        a.close()
        deadline = time.monotonic() + 10
        while b.peers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not b.peers()
        time.sleep(1.0)  # b keeps trying meanwhile (connection refused)
        a = start_a()
        restarted = time.monotonic()
        while not b.peers() and time.monotonic() < restarted + 10:
            time.sleep(0.05)
        assert b.peers() and b.peers()[0]["peer_id"] == str(key.peer_id)
        assert time.monotonic() - restarted < 3.0
    finally:
        b.close()
        a.close()


async def _keep(node, peer) -> bool:
    return node.connmgr.keep(peer)
