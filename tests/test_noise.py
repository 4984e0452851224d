"""The Noise XX handshake as a pure state machine, and its failure modes."""

import pytest

from lattice.errors import HandshakeError, ProtocolError
from lattice.identity import KeyPair
from lattice.transport.noise import XXHandshake


def _handshake(a_id=None, b_id=None):
    a = XXHandshake(a_id or KeyPair.generate(), initiator=True)
    b = XXHandshake(b_id or KeyPair.generate(), initiator=False)
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
