"""Run the go-libp2p daemon ``p2pd`` and speak its control protocol (for tests/test_interop_go.py).

The binary comes from hivemind's wheel (``bash tools/get_p2pd.sh``). The control protocol: each
request and response is a uvarint length + protobuf (``p2pclient.p2pd.pb`` in hivemind's
``proto/p2pd.proto``), one request per control connection; after a successful STREAM_OPEN the
control connection *is* the libp2p stream. Encoded here with lattice's bounded protobuf codec.

The daemon only ever listens on 127.0.0.1 and is started with no bootstrap (``-b`` alone would dial
the public IPFS nodes), no relay, no AutoNAT and no UPnP/NAT-PMP.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from lattice import _proto
from lattice.identity import KeyPair, PeerId
from lattice.multiaddr import Multiaddr, MultiaddrError

__all__ = ["ControlClient", "P2PDError", "P2PDaemon", "PeerRecord", "find_p2pd", "start_p2pd"]

MAX_MESSAGE = 4 * 1024 * 1024

# Request.Type
IDENTIFY, CONNECT, STREAM_OPEN, STREAM_HANDLER, DHT, LIST_PEERS, CONNMANAGER, DISCONNECT = range(8)
# DHTRequest.Type
(
    DHT_FIND_PEER,
    DHT_FIND_PEERS_CONNECTED_TO_PEER,
    DHT_FIND_PROVIDERS,
    DHT_GET_CLOSEST_PEERS,
    DHT_GET_PUBLIC_KEY,
    DHT_GET_VALUE,
    DHT_SEARCH_VALUE,
    DHT_PUT_VALUE,
    DHT_PROVIDE,
) = range(9)
# DHTResponse.Type
DHT_BEGIN, DHT_VALUE, DHT_END = range(3)


class P2PDError(Exception):
    """The daemon answered ERROR (message in ``args[0]``), or misbehaved."""


def find_p2pd() -> Path | None:
    """``$LATTICE_P2PD`` if set, else ``$HOME/.cache/lattice/p2pd/p2pd`` (where get_p2pd.sh puts it)."""
    env = os.environ.get("LATTICE_P2PD")
    candidates = [Path(env)] if env else []
    candidates.append(Path.home() / ".cache" / "lattice" / "p2pd" / "p2pd")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


@dataclass
class PeerRecord:
    """A ``PeerInfo`` from the daemon: peer id and the multiaddrs we can parse."""

    peer: PeerId
    addrs: list[Multiaddr] = field(default_factory=list)


def _parse_addrs(raw: list[bytes]) -> list[Multiaddr]:
    out = []
    for a in raw:
        try:
            out.append(Multiaddr.from_bytes(a))
        except MultiaddrError:
            continue  # e.g. an address kind lattice does not speak
    return out


def _peer_record(data: bytes) -> PeerRecord:
    f = _proto.decode(data)
    return PeerRecord(PeerId(_proto.one_bytes(f, 1, required=True)), _parse_addrs(_proto.all_bytes(f, 2)))


class _Conn:
    """One control connection: uvarint-delimited messages, then (after STREAM_OPEN) raw bytes."""

    def __init__(self, stream: trio.abc.HalfCloseableStream) -> None:
        self.stream = stream
        self.protocol = ""  # the protocol a STREAM_OPEN negotiated
        self._buf = bytearray()

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        if not data:
            return False
        self._buf += data
        return True

    async def send_msg(self, body: bytes) -> None:
        await self.stream.send_all(_proto.encode_uvarint(len(body)) + body)

    async def read_msg(self) -> bytes:
        while True:
            try:
                length, pos = _proto.decode_uvarint(self._buf)
            except _proto.TruncatedError:
                if not await self._fill():
                    raise P2PDError("control connection closed by the daemon") from None
                continue
            if length > MAX_MESSAGE:
                raise P2PDError(f"control message of {length} bytes is too large")
            while len(self._buf) < pos + length:
                if not await self._fill():
                    raise P2PDError("control connection closed inside a message")
            body = bytes(self._buf[pos : pos + length])
            del self._buf[: pos + length]
            return body

    # raw stream use (after STREAM_OPEN)
    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not await self._fill():
                raise P2PDError(f"stream ended after {len(self._buf)} of {n} bytes")
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()


def _check(response: bytes) -> dict[int, list[int | bytes]]:
    fields = _proto.decode(response)
    if _proto.one_int(fields, 1) != 0:  # Response.Type ERROR
        err = _proto.one_bytes(fields, 2)
        msg = _proto.one_bytes(_proto.decode(err), 1) if err else b""
        raise P2PDError((msg or b"unknown error").decode("utf-8", "replace"))
    return fields


class ControlClient:
    """Client of the daemon's control socket (a unix socket path)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    async def _open(self) -> _Conn:
        return _Conn(await trio.open_unix_socket(self.socket_path))

    async def _call(self, request: bytes) -> dict[int, list[int | bytes]]:
        conn = await self._open()
        try:
            await conn.send_msg(request)
            return _check(await conn.read_msg())
        finally:
            await conn.aclose()

    async def identify(self) -> PeerRecord:
        fields = await self._call(_proto.encode([(1, IDENTIFY)]))
        return _peer_record(_proto.one_bytes(fields, 4, required=True))

    async def connect(self, peer: PeerId, addrs: list[Multiaddr], timeout: int = 10) -> None:
        connect = [(1, peer.multihash)] + [(2, a.without_peer().to_bytes()) for a in addrs] + [(3, timeout)]
        await self._call(_proto.encode([(1, CONNECT), (2, _proto.encode(connect))]))

    async def disconnect(self, peer: PeerId) -> None:
        await self._call(_proto.encode([(1, DISCONNECT), (7, _proto.encode([(1, peer.multihash)]))]))

    async def list_peers(self) -> list[PeerRecord]:
        fields = await self._call(_proto.encode([(1, LIST_PEERS)]))
        return [_peer_record(raw) for raw in _proto.all_bytes(fields, 6)]

    @asynccontextmanager
    async def stream_open(
        self, peer: PeerId, protocols: list[str], timeout: int = 10
    ) -> AsyncIterator[_Conn]:
        """A libp2p stream from the daemon to ``peer``: ``send_all`` / ``read_exactly`` on it."""
        body = [(1, peer.multihash)] + [(2, p) for p in protocols] + [(3, timeout)]
        conn = await self._open()
        try:
            await conn.send_msg(_proto.encode([(1, STREAM_OPEN), (3, _proto.encode(body))]))
            fields = _check(await conn.read_msg())
            info = _proto.decode(_proto.one_bytes(fields, 3, required=True))  # StreamInfo{peer, addr, proto}
            conn.protocol = (_proto.one_bytes(info, 3) or b"").decode()
            yield conn
        finally:
            await conn.aclose()

    async def dht(self, dht_type: int, *, peer: PeerId | None = None, cid: bytes | None = None,
                  key: bytes | None = None, value: bytes | None = None, count: int | None = None,
                  timeout: int = 10) -> list[dict[int, list[int | bytes]]]:  # fmt: skip
        """A DHT request; the DHTResponse messages (one, or the VALUEs between BEGIN and END)."""
        body = [(1, dht_type), (2, peer.multihash if peer else None), (3, cid), (4, key), (5, value),
                (6, count), (7, timeout)]  # fmt: skip
        conn = await self._open()
        try:
            await conn.send_msg(_proto.encode([(1, DHT), (5, _proto.encode(body))]))
            fields = _check(await conn.read_msg())
            first = _proto.decode(_proto.one_bytes(fields, 5) or b"")
            if _proto.one_int(first, 1) != DHT_BEGIN:
                return [first]
            out = []
            for _ in range(10_000):
                message = _proto.decode(await conn.read_msg())
                if _proto.one_int(message, 1) == DHT_END:
                    return out
                out.append(message)
            raise P2PDError("DHT response stream did not end")
        finally:
            await conn.aclose()

    async def find_peer(self, peer: PeerId, timeout: int = 10) -> PeerRecord:
        (reply,) = await self.dht(DHT_FIND_PEER, peer=peer, timeout=timeout)
        return _peer_record(_proto.one_bytes(reply, 2, required=True))

    async def get_closest_peers(self, key: bytes, timeout: int = 10) -> list[PeerId]:
        replies = await self.dht(DHT_GET_CLOSEST_PEERS, key=key, timeout=timeout)
        return [PeerId(_proto.one_bytes(r, 3, required=True)) for r in replies]

    async def provide(self, cid: bytes, timeout: int = 10) -> None:
        """Announce ``cid`` (binary CID; a bare sha2-256 multihash is a CIDv0) to the closest peers."""
        await self.dht(DHT_PROVIDE, cid=cid, timeout=timeout)

    async def put_value(self, key: bytes, value: bytes, timeout: int = 10) -> None:
        """PUT_VALUE of a libp2p record (go validates it first: ``/pk/<peer id>`` -> its public key)."""
        await self.dht(DHT_PUT_VALUE, key=key, value=value, timeout=timeout)

    async def find_providers(self, cid: bytes, count: int = 20, timeout: int = 10) -> list[PeerRecord]:
        replies = await self.dht(DHT_FIND_PROVIDERS, cid=cid, count=count, timeout=timeout)
        return [_peer_record(_proto.one_bytes(r, 2, required=True)) for r in replies]


@dataclass
class P2PDaemon:
    """A running p2pd: its identity, control client and the libp2p addresses it listens on."""

    process: trio.Process
    keypair: KeyPair
    control: ControlClient
    addrs: list[Multiaddr]
    log_path: Path

    @property
    def peer_id(self) -> PeerId:
        return self.keypair.peer_id

    def log(self, limit: int = 20_000) -> str:
        return _tail(self.log_path, limit)


@asynccontextmanager
async def start_p2pd(
    binary: Path,
    *,
    dht: str = "server",
    extra_args: tuple[str, ...] = (),
    log_level: str = "info",
    start_timeout: float = 20.0,
) -> AsyncIterator[P2PDaemon]:
    """Start p2pd on 127.0.0.1 with a fresh Ed25519 identity; killed (never left behind) on exit.

    ``dht``: "server", "client", "auto" or "" (no DHT). The daemon's log (GOLOG_LOG_LEVEL=log_level)
    goes to a file that is printed if the block raises.
    """
    workdir = Path(tempfile.mkdtemp(prefix="p2pd-"))  # short path: unix socket paths are limited
    keypair = KeyPair.generate()
    key_file = workdir / "identity.key"
    key_file.write_bytes(keypair.to_protobuf())
    key_file.chmod(0o600)
    socket_path = str(workdir / "control.sock")
    log_path = workdir / "p2pd.log"
    args = [
        str(binary),
        f"-listen=/unix{socket_path}",
        "-hostAddrs=/ip4/127.0.0.1/tcp/0",
        f"-id={key_file}",
        "-b=0",
        "-autonat=0",
        "-natPortMap=0",
        "-relay=0",
        "-q",
    ]
    args += {"server": ["-dhtServer"], "client": ["-dhtClient"], "auto": ["-dht"], "": []}[dht]
    args += list(extra_args)
    env = {**os.environ, "GOLOG_LOG_LEVEL": log_level, "GOLOG_LOG_FMT": "nocolor"}
    process = None
    failed = True
    try:
        with open(log_path, "wb") as log_file:
            process = await trio.lowlevel.open_process(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                env=env,
                start_new_session=True,
            )
        control = ControlClient(socket_path)
        me = None
        with trio.fail_after(start_timeout):
            while me is None:
                if process.poll() is not None:
                    raise P2PDError(f"p2pd exited with {process.returncode}: {_tail(log_path)}")
                try:
                    me = await control.identify()
                except (OSError, P2PDError):
                    await trio.sleep(0.05)
        if me.peer != keypair.peer_id:
            raise P2PDError(f"p2pd runs as {me.peer}, not the identity we gave it ({keypair.peer_id})")
        daemon = P2PDaemon(process, keypair, control, [a for a in me.addrs if a.tcp_target()], log_path)
        yield daemon
        failed = False
    finally:
        if process is not None:
            with trio.CancelScope(shield=True):
                await _stop(process)
        if failed:
            print(f"---- p2pd log ({log_path}) ----\n{_tail(log_path)}")
        shutil.rmtree(workdir, ignore_errors=True)


async def _stop(process: trio.Process, grace: float = 3.0) -> None:
    if process.returncode is None:
        try:
            process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        with trio.move_on_after(grace):
            await process.wait()
    if process.returncode is None:
        process.kill()
        with trio.move_on_after(grace):
            await process.wait()


def _tail(path: Path, limit: int = 20_000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""
