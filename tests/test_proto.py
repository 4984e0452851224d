import pytest

from lattice import _proto


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32, 2**63 - 1])
def test_uvarint_roundtrip(value):
    data = _proto.encode_uvarint(value)
    assert _proto.decode_uvarint(data) == (value, len(data))


def test_uvarint_truncated_and_too_long():
    with pytest.raises(_proto.TruncatedError):
        _proto.decode_uvarint(b"\x80\x80")
    with pytest.raises(_proto.DecodeError):
        _proto.decode_uvarint(b"\xff" * 11)


def test_message_roundtrip_and_last_value_wins():
    data = _proto.encode([(1, 7), (2, b"abc"), (3, "x"), (3, "y"), (4, None), (2, b"final")])
    fields = _proto.decode(data)
    assert _proto.one_int(fields, 1) == 7
    assert _proto.one_bytes(fields, 2) == b"final"
    assert _proto.all_bytes(fields, 3) == [b"x", b"y"]
    assert 4 not in fields


@pytest.mark.parametrize(
    "garbage",
    [b"\x0a\x05ab", b"\x00\x01", b"\x0b", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x09\x01"],
)
def test_malformed_messages_are_rejected(garbage):
    with pytest.raises(_proto.DecodeError):
        _proto.decode(garbage)


def test_field_count_is_bounded():
    with pytest.raises(_proto.DecodeError):
        _proto.decode(_proto.encode([(1, 1)] * 20), max_fields=10)
