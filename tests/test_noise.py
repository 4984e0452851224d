"""The Noise XX handshake as a pure state machine, and its failure modes."""

import pytest

from lattice import _proto
from lattice.errors import HandshakeError, ProtocolError
from lattice.identity import KeyPair
from lattice.transport import noise
from lattice.transport.noise import XXHandshake, negotiated_muxer


def _handshake(a_id=None, b_id=None, a_muxers=(), b_muxers=(), a_ciphers=(), b_ciphers=()):
    a = XXHandshake(a_id or KeyPair.generate(), initiator=True, muxers=a_muxers, ciphers=a_ciphers)
    b = XXHandshake(b_id or KeyPair.generate(), initiator=False, muxers=b_muxers, ciphers=b_ciphers)
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


def _talk(a, b, rounds=3):
    a_send, a_recv = a.split()
    b_send, b_recv = b.split()
    for i in range(rounds):
        assert b_recv.decrypt(a_send.encrypt(b"hello %d" % i)) == b"hello %d" % i
        assert a_recv.decrypt(b_send.encrypt(b"back %d" % i)) == b"back %d" % i
    return a_send, b_recv


def test_aes_gcm_is_used_only_when_both_sides_offer_it():
    a, b = _handshake(a_ciphers=["AESGCM"], b_ciphers=["AESGCM"])
    assert a.remote_ciphers == b.remote_ciphers == ("AESGCM",)
    assert a.cipher == b.cipher == "AESGCM"
    send, _ = _talk(a, b)
    assert send.cipher == "AESGCM"
    # an older Lattice node, or go/rust-libp2p (they ignore the unknown extension field): ChaChaPoly
    for a_ciphers, b_ciphers in ((["AESGCM"], []), ([], ["AESGCM"]), ([], []), (["AESGCM"], ["Other"])):
        a, b = _handshake(a_ciphers=a_ciphers, b_ciphers=b_ciphers)
        assert a.cipher == b.cipher == "ChaChaPoly"
        send, _ = _talk(a, b)
        assert send.cipher == "ChaChaPoly"


def test_the_cipher_field_leaves_the_muxer_list_alone():
    a, b = _handshake(a_muxers=["/yamux/1.0.0"], b_muxers=["/yamux/1.0.0"], a_ciphers=["AESGCM"])
    assert b.remote_muxers == ("/yamux/1.0.0",) and b.remote_ciphers == ("AESGCM",)
    assert a.muxer == b.muxer == "/yamux/1.0.0" and a.cipher == "ChaChaPoly"


def test_aes_gcm_frames_are_noise_aesgcm_with_a_big_endian_nonce():
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = bytes(range(32))
    state = noise.CipherState(key, "AESGCM")
    state.encrypt(b"first")
    nonce = b"\0" * 4 + (1).to_bytes(8, "big")
    assert state.encrypt(b"second") == AESGCM(key).encrypt(nonce, b"second", None)
    with pytest.raises(ValueError, match="unknown noise cipher"):
        noise.CipherState(key, "ROT13")


def test_aes_gcm_rekeys_both_directions_in_step(monkeypatch):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    monkeypatch.setattr(noise, "REKEY_EVERY", 4)
    a, b = _handshake(a_ciphers=["AESGCM"], b_ciphers=["AESGCM"])
    _talk(a, b, rounds=11)  # 11 messages each way, both directions rekeyed at 4 and 8: all decrypt
    key = bytes(32)
    state = noise.CipherState(key, "AESGCM")
    for _ in range(4):
        state.encrypt(b"x")
    max_nonce = b"\0" * 4 + (2**64 - 1).to_bytes(8, "big")
    rekeyed = AESGCM(key).encrypt(max_nonce, bytes(32), None)[:32]  # Noise's REKEY
    assert state.encrypt(b"x") == AESGCM(rekeyed).encrypt(b"\0" * 4 + (4).to_bytes(8, "big"), b"x", None)
    with pytest.raises(ProtocolError):  # a receiver that did not rekey cannot read the sender
        stale = noise.CipherState(key, "AESGCM")
        stale.n = 4
        stale._next_rekey = 8
        stale.decrypt(state.encrypt(b"y"))


def test_a_peers_cipher_list_is_bounded():
    def flooding(names):
        class Flooding(XXHandshake):
            def _payload(self):
                listed = [(noise.CIPHERS_FIELD, n) for n in names]
                return super()._payload() + _proto.encode([(4, _proto.encode(listed))])

        return Flooding(KeyPair.generate(), initiator=False)

    cases = (([f"C{i}" for i in range(10)], "cipher"), ([f"C{i}" for i in range(500)], "too many"))
    for names, error in cases:
        a = XXHandshake(KeyPair.generate(), initiator=True, ciphers=["AESGCM"])
        b = flooding(names)
        b.read_message(a.write_message())
        with pytest.raises(HandshakeError, match=error):
            a.read_message(b.write_message())
