import os

import pytest

from lattice.errors import IdentityError
from lattice.identity import KeyPair, PeerId, PublicKey, b58decode, b58encode, load_or_create_key, verify_for


def test_peer_id_roundtrip_and_inlined_key():
    pair = KeyPair.generate()
    text = pair.peer_id.to_base58()
    assert text.startswith("12D3KooW")
    parsed = PeerId.from_string(text)
    assert parsed == pair.peer_id and hash(parsed) == hash(pair.peer_id)
    assert parsed.public_key() == pair.public_key


def test_peer_id_matches_py_libp2p():
    libp2p_ed25519 = pytest.importorskip("libp2p.crypto.ed25519")
    from libp2p.peer.id import ID

    seed = bytes(range(32))
    ours = KeyPair.from_seed(seed)
    theirs = libp2p_ed25519.create_new_key_pair(seed)
    assert str(ours.peer_id) == ID.from_pubkey(theirs.public_key).to_base58()


@pytest.mark.parametrize("raw", [b"\xff" * 20, b"\x12\x80", b"\x80\x80\x80"])
def test_bytes_that_are_no_multihash_are_an_identity_error(raw):
    with pytest.raises(IdentityError):
        PeerId(raw)


def test_base58_leading_zeros():
    for data in (b"", b"\0", b"\0\0\x01", os.urandom(40)):
        assert b58decode(b58encode(data)) == data


@pytest.mark.parametrize("text", ["", "0OIl", "12D3KooW", "x" * 300])
def test_invalid_peer_ids(text):
    with pytest.raises(IdentityError):
        PeerId.from_string(text)


def test_domain_separated_signatures():
    pair = KeyPair.generate()
    sig = pair.sign_for("dht-record", b"payload")
    assert verify_for(pair.public_key, "dht-record", b"payload", sig)
    assert not verify_for(pair.public_key, "crdt-update", b"payload", sig)
    assert not verify_for(pair.public_key, "dht-record", b"payload!", sig)
    assert not verify_for(KeyPair.generate().public_key, "dht-record", b"payload", sig)


def test_key_file_created_0600_and_reloaded(tmp_path):
    path = tmp_path / "sub" / "node.key"
    first = load_or_create_key(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert load_or_create_key(path).peer_id == first.peer_id
    assert KeyPair.from_protobuf(path.read_bytes()).peer_id == first.peer_id


def test_world_readable_key_is_refused(tmp_path):
    path = tmp_path / "node.key"
    load_or_create_key(path)
    path.chmod(0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_or_create_key(path)


def test_malformed_missing_and_wrong_type_keys(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"not a key at all")
    bad.chmod(0o600)
    with pytest.raises(IdentityError):
        load_or_create_key(bad)
    with pytest.raises(IdentityError, match="does not exist"):
        load_or_create_key(tmp_path / "missing.key", create=False)
    rsa_like = tmp_path / "rsa.key"
    rsa_like.write_bytes(b"\x08\x00\x12\x01\x00")
    rsa_like.chmod(0o600)
    with pytest.raises(IdentityError, match="unsupported"):
        load_or_create_key(rsa_like)


def test_public_key_protobuf_validation():
    with pytest.raises(IdentityError):
        PublicKey.from_protobuf(b"\x08\x01\x12\x03abc")
