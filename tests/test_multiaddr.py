import pytest

from lattice.identity import KeyPair
from lattice.multiaddr import Multiaddr, MultiaddrError

PEER = str(KeyPair.from_seed(b"\1" * 32).peer_id)
GOOD = [
    "/ip4/127.0.0.1/tcp/4001",
    f"/ip4/1.2.3.4/tcp/4001/p2p/{PEER}",
    "/ip6/::1/tcp/0",
    "/dns4/example.test/tcp/443/wss",
    f"/ip4/1.2.3.4/tcp/4001/p2p/{PEER}/p2p-circuit/p2p/{PEER}",
    "/ip4/10.0.0.1/udp/4001/quic-v1",
]


@pytest.mark.parametrize("text", GOOD)
def test_text_and_binary_roundtrip(text):
    ma = Multiaddr.parse(text)
    assert str(ma) == text
    assert Multiaddr.from_bytes(ma.to_bytes()) == ma


@pytest.mark.parametrize("text", GOOD)
def test_binary_matches_py_multiaddr(text):
    pymultiaddr = pytest.importorskip("multiaddr")
    assert Multiaddr.parse(text).to_bytes() == pymultiaddr.Multiaddr(text).to_bytes()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ip4/1.2.3.4",
        "/ip4/1.2.3.999/tcp/1",
        "/ip4/1.2.3.4/tcp/70000",
        "/ip4/1.2.3.4/tcp",
        "/foo/1",
        "/ip4/1.2.3.4/tcp/1/p2p/notapeer",
    ],
)
def test_malformed(text):
    with pytest.raises(MultiaddrError):
        Multiaddr.parse(text)


@pytest.mark.parametrize("data", [b"\x04\x01\x02", b"\xff\xff\x03", b"\x06", b"\xa5\x03\x05ab"])
def test_malformed_binary(data):
    with pytest.raises(MultiaddrError):
        Multiaddr.from_bytes(data)


def test_helpers():
    ma = Multiaddr.parse(f"/ip4/1.2.3.4/tcp/4001/p2p/{PEER}")
    assert ma.tcp_target() == ("1.2.3.4", 4001)
    assert str(ma.peer_id) == PEER
    assert ma.without_peer() == Multiaddr.parse("/ip4/1.2.3.4/tcp/4001")
    relayed = Multiaddr.parse(GOOD[4])
    assert relayed.is_relayed and relayed.tcp_target() is None
