"""The Noise XX handshake as a pure state machine, and its failure modes."""

import pytest

from lattice import _proto
from lattice.errors import HandshakeError, ProtocolError
from lattice.identity import KeyPair
from lattice.transport.noise import XXHandshake, negotiated_muxer


def _handshake(a_id=None, b_id=None, a_muxers=(), b_muxers=()):
    a = XXHandshake(a_id or KeyPair.generate(), initiator=True, muxers=a_muxers)
    b = XXHandshake(b_id or KeyPair.generate(), initiator=False, muxers=b_muxers)
    b.read_message(a.write_message())
    a.read_message(b.write_message())
    b.read_message(a.write_message())
    return a, b


def test_handshake_authenticates_both_sides_and_keys_match():
    ida, idb = KeyPair.generate(), KeyPair.generate()
    a, b = _handshake(ida, idb)
    assert a.remote_identity == idb.public_key and b.remote_identity == ida.public_key
    a_send, a_recv = a.split()
    b_send, b_recv = b.split()
    for i in range(3):
        assert b_recv.decrypt(a_send.encrypt(b"hello %d" % i)) == b"hello %d" % i
        assert a_recv.decrypt(b_send.encrypt(b"back")) == b"back"


def test_tampered_handshake_message_is_rejected():
    a = XXHandshake(KeyPair.generate(), initiator=True)
    b = XXHandshake(KeyPair.generate(), initiator=False)
    b.read_message(a.write_message())
    msg2 = bytearray(b.write_message())
    msg2[40] ^= 1
    with pytest.raises(HandshakeError):
        a.read_message(bytes(msg2))


def test_short_messages_and_out_of_order_calls():
    a = XXHandshake(KeyPair.generate(), initiator=True)
    with pytest.raises(HandshakeError):
        a.read_message(b"\0" * 10)
    b = XXHandshake(KeyPair.generate(), initiator=False)
    with pytest.raises(HandshakeError):
        b.read_message(b"short")


def test_replayed_or_corrupt_transport_frame_fails_authentication():
    a, b = _handshake()
    send, _ = a.split()
    _, recv = b.split()
    frame = send.encrypt(b"payload")
    assert recv.decrypt(frame) == b"payload"
    with pytest.raises(ProtocolError):
        recv.decrypt(frame)  # replay: the nonce moved on


def test_muxers_listed_in_the_handshake_agree_on_the_initiators_first_common_one():
    a, b = _handshake(a_muxers=["/yamux/1.0.0", "/mplex/6.7.0"], b_muxers=["/mplex/6.7.0", "/yamux/1.0.0"])
    assert a.remote_muxers == ("/mplex/6.7.0", "/yamux/1.0.0") and b.remote_muxers == (
        "/yamux/1.0.0",
        "/mplex/6.7.0",
    )
    assert a.muxer == b.muxer == "/yamux/1.0.0"  # the spec's example: the initiator's preference wins


def test_a_side_listing_no_muxers_falls_back_to_multistream():
    for a_muxers, b_muxers in ((["/yamux/1.0.0"], []), ([], ["/yamux/1.0.0"]), ([], [])):
        a, b = _handshake(a_muxers=a_muxers, b_muxers=b_muxers)
        assert a.muxer is None and b.muxer is None


def test_muxer_lists_without_a_common_one_fail_the_handshake():
    a, b = _handshake(a_muxers=["/yamux/1.0.0"], b_muxers=["/mplex/6.7.0"])
    with pytest.raises(HandshakeError):
        a.muxer  # noqa: B018
    with pytest.raises(HandshakeError):
        b.muxer  # noqa: B018
    assert negotiated_muxer(["/a", "/b"], ["/b"]) == "/b"


def test_a_peers_muxer_list_is_bounded():
    def flooding(names):
        class Flooding(XXHandshake):
            def _payload(self):
                return super()._payload() + _proto.encode([(4, _proto.encode([(2, n) for n in names]))])

        return Flooding(KeyPair.generate(), initiator=False)

    for names in ([f"/m{i}" for i in range(20)], [f"/m{i}" for i in range(5000)], ["/" + "x" * 1000]):
        a = XXHandshake(KeyPair.generate(), initiator=True)
        b = flooding(names)
        b.read_message(a.write_message())
        with pytest.raises(HandshakeError, match=r"stream muxer|too many fields"):
            a.read_message(b.write_message())
