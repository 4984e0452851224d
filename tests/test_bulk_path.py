"""The bulk data path: payload frames decrypted straight into the receiving tensor, any framing."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import trio

from conftest import rpc_pair
from lattice import NodeConfig
from lattice.identity import PeerId
from lattice.rpc import wire
from lattice.rpc.service import PROTOCOL_ID


def _cfg(tmp_path, name):
    return NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / name, control=False)


@pytest.fixture
async def pair(tmp_path, nursery):
    """Two running nodes, b connected to a; a serves 'echo'."""
    return await rpc_pair(tmp_path, nursery, client_max_message=64 << 20)


def _sessions(node):
    return [c.session for c in node.host.connections()]


async def test_large_tensor_is_decrypted_in_place(pair):
    a, b, peer = pair
    x = np.random.default_rng(1).standard_normal(4 << 20).astype(np.float32)  # 16 MiB
    before = sum(s.bytes_in_place for s in _sessions(a) + _sessions(b))
    for _ in range(2):
        assert np.array_equal(await b.rpc.call(peer, "echo", x), x)
    placed = sum(s.bytes_in_place for s in _sessions(a) + _sessions(b)) - before
    assert placed > 0.9 * 4 * x.nbytes  # two calls, each way: almost nothing copied after decryption


async def test_a_bulk_transfer_is_read_from_the_socket_in_large_pieces(pair):
    """The receive buffer is a whole pooled block (2 MiB), not one frame's worth: a bulk transfer
    costs a few socket reads (and pump passes) per MiB, not ~16 (issue 20: 56 KiB per read)."""
    a, b, peer = pair
    x = np.random.default_rng(4).standard_normal(4 << 20).astype(np.float32)  # 16 MiB
    await b.rpc.call(peer, "echo", 1)

    def reads():
        return sum(c.session.secure.reads for c in a.host.connections() + b.host.connections())

    before = reads()
    for _ in range(2):
        assert np.array_equal(await b.rpc.call(peer, "echo", x), x)
    assert reads() - before < 200  # 64 MiB moved: ~60 reads measured (~620 with one-frame buffers)


@pytest.mark.parametrize("max_frame", [1000, 65519 + 7, 256 * 1024])
async def test_unaligned_frames_from_other_implementations_still_arrive_intact(pair, max_frame):
    """Other libp2p implementations frame differently (headers and payload share Noise frames)."""
    a, b, peer = pair
    for s in _sessions(a) + _sessions(b):
        s.max_frame = max_frame
    x = np.random.default_rng(2).standard_normal((3 << 18) + 5).astype(np.float32)
    assert np.array_equal(await b.rpc.call(peer, "echo", x), x)
    assert await b.rpc.call(peer, "echo", 7) == 7


async def test_wrong_checksum_on_an_in_place_payload_is_refused(pair):
    """The CRC is computed over the destination after the in-place decryption: a sender whose
    Noise frames are fine but whose bytes are wrong is caught, and the handler never runs."""
    a, b, peer = pair
    arr = np.random.default_rng(3).standard_normal(1 << 20).astype(np.float32)  # 4 MiB: bulk path
    calls = a.rpc.counters["calls_in"]
    rogue = await b.host.new_stream(PeerId.from_string(peer), [PROTOCOL_ID])
    doc, buffers = wire.tensors.encode(arr)
    await rogue.write(wire.encode_header(wire.CALL, doc, arr.nbytes, method="echo", last=True))
    await rogue.write(buffers[0])
    await rogue.write(struct.pack(">I", zlib.crc32(buffers[0]) ^ 1), fin=True)
    with trio.fail_after(10):
        err = await wire.receive(rogue, 1 << 20)
    assert err.kind == "err" and "checksum" in err.error_message
    assert a.rpc.counters["calls_in"] == calls
    assert await b.rpc.call(peer, "echo", 1) == 1
