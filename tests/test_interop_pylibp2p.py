"""Wire compatibility with another libp2p implementation (py-libp2p 0.8.1), both directions."""

from __future__ import annotations

import pytest
import trio

from conftest import full_addr

libp2p = pytest.importorskip("libp2p", reason="py-libp2p (the interop reference) is not installed")
from libp2p import new_host  # noqa: E402
from libp2p.crypto.ed25519 import create_new_key_pair  # noqa: E402
from libp2p.host.ping import PingService  # noqa: E402
from libp2p.peer.peerinfo import info_from_p2p_addr  # noqa: E402
from multiaddr import Multiaddr as PyMultiaddr  # noqa: E402

from lattice.identity import PeerId  # noqa: E402
from lattice.transport import ping  # noqa: E402

pytestmark = pytest.mark.interop


async def test_pylibp2p_dials_us_identifies_and_pings(host_factory):
    ours = await host_factory()
    theirs = new_host(key_pair=create_new_key_pair())
    async with theirs.run(listen_addrs=[PyMultiaddr("/ip4/127.0.0.1/tcp/0")]):
        with trio.fail_after(15):
            await theirs.connect(info_from_p2p_addr(PyMultiaddr(str(full_addr(ours)))))
            rtts = await PingService(theirs).ping(ours.peer_id and _py_id(ours.peer_id), ping_amt=3)
            assert len(rtts) == 3
            their_id = PeerId.from_string(theirs.get_id().to_base58())
            info = await ours.wait_identified(their_id)
            assert "/ipfs/ping/1.0.0" in info.protocols
            assert info.public_key is not None and info.public_key.peer_id() == their_id
            conn = ours.connection_to(their_id)
            assert conn is not None and conn.direction == "inbound"


async def test_we_dial_pylibp2p_identify_and_ping(host_factory):
    ours = await host_factory()
    theirs = new_host(key_pair=create_new_key_pair())
    async with theirs.run(listen_addrs=[PyMultiaddr("/ip4/127.0.0.1/tcp/0")]):
        addr = f"{theirs.get_addrs()[0]}"
        if "/p2p/" not in addr:
            addr += f"/p2p/{theirs.get_id().to_base58()}"
        with trio.fail_after(15):
            conn = await ours.connect(addr)
            info = await ours.wait_identified(conn.remote_peer)
            assert info.agent_version  # py-libp2p sent its agent string
            assert any(a.tcp_target() for a in info.addrs)
            rtts = await ping.ping(ours, conn.remote_peer, count=5)
            assert len(rtts) == 5 and all(r > 0 for r in rtts)


def _py_id(peer: PeerId):
    from libp2p.peer.id import ID

    return ID(peer.multihash)
