"""The client side: find a chain of stage servers, run a session through it, survive dead stages.

    client = MeshClient(node, "tiny-random-0")
    async with client.session() as session:
        async for token in session.generate(prompt_ids, max_new_tokens=16):
            print(token)

A session remembers, for every hop, the inputs it sent. When a hop fails (its process died, it
timed out, it refuses), the client finds other servers for that hop's blocks and replays those
inputs in one call (run in the same steps, so the rebuilt cache is bitwise the same) before going
on: the generated tokens do not change.

A thin client needs no copy of the model: :meth:`MeshClient.model_card` reads the config, stop
tokens and chat format from a server, :meth:`MeshClient.tokenizer` fetches the tokenizer through
the content layer by the id the card names.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import trio

from lattice.apps.mesh_inference.card import MAX_TOKENIZER_BYTES, ModelCard
from lattice.apps.mesh_inference.errors import REROUTE_ERRORS, MeshError, NoChainError
from lattice.apps.mesh_inference.routing import Hop, ServerInfo, announcement_key, find_chain
from lattice.apps.mesh_inference.sampling import Sampler, Sampling
from lattice.errors import DialError, LatticeError
from lattice.rpc import RemoteError, RPCError

if TYPE_CHECKING:
    from lattice.node import Node

log = logging.getLogger(__name__)

CARD_TRIES = 4  # servers asked for the model card (and offered as the tokenizer's providers)


class MeshClient:
    """Finds stage servers of ``model_id`` through the DHT and opens sessions over them."""

    def __init__(
        self,
        node: Node,
        model_id: str,
        *,
        call_timeout: float = 30.0,
        recover_timeout: float = 10.0,
        refresh_interval: float = 5.0,
    ) -> None:
        self.node = node
        self.model_id = model_id
        self.call_timeout = call_timeout
        self.recover_timeout = recover_timeout
        self.refresh_interval = refresh_interval
        self._servers: list[ServerInfo] = []
        self._fetched_at = 0.0
        self._card: ModelCard | None = None
        self._tokenizer: Any = None

    async def servers(self, fresh: bool = False) -> list[ServerInfo]:
        """Announced servers (cached for ``refresh_interval`` unless ``fresh``)."""
        if fresh or not self._servers or time.monotonic() - self._fetched_at > self.refresh_interval:
            entries = await self.node.dht.get(announcement_key(self.model_id), latest=True)
            found = {}
            for e in entries:
                info = ServerInfo.decode(e.publisher, e.value)
                if info is not None and e.expires_at > time.time():
                    found[info.peer] = info
            self._servers = sorted(found.values(), key=lambda s: (s.start, s.peer))
            self._fetched_at = time.monotonic()
        return self._servers

    def forget_servers(self) -> None:
        """The next :meth:`servers` asks the DHT again (the cached list failed us)."""
        self._fetched_at = 0.0

    async def n_layers(self) -> int:
        servers = await self.servers()
        if not servers:
            raise NoChainError(self.model_id, [])
        counts: dict[int, int] = {}
        for s in servers:
            counts[s.n_layers] = counts.get(s.n_layers, 0) + 1
        return max(counts, key=lambda n: counts[n])

    async def find_chain(
        self, exclude: Sequence[str] = (), start: int = 0, end: int | None = None
    ) -> list[Hop]:
        """A chain covering blocks [start, end) (all by default); NoChainError names what is missing."""
        n = await self.n_layers()
        end = n if end is None else end
        servers = [s for s in await self.servers() if s.n_layers == n]
        try:
            return find_chain(servers, start, end, self.model_id, exclude)
        except NoChainError:
            servers = [s for s in await self.servers(fresh=True) if s.n_layers == n]
            return find_chain(servers, start, end, self.model_id, exclude)

    async def wait_for_chain(self, timeout: float = 10.0) -> list[Hop]:
        """Poll the DHT until a chain exists (servers announce a moment after they start)."""
        with trio.move_on_after(timeout):
            while True:
                try:
                    return await self.find_chain()
                except NoChainError:
                    await trio.sleep(0.1)
                    self.forget_servers()
        return await self.find_chain()

    def session(self) -> InferenceSession:
        return InferenceSession(self)

    async def model_card(self) -> ModelCard:
        """The model's card (config, tokenizer id, stop tokens, chat format) from the first server
        that gives a well-formed one; cached."""
        if self._card is not None:
            return self._card
        errors = []
        for server in (await self.servers())[:CARD_TRIES]:
            try:
                info = await self.call(server, "mesh.info", {}, timeout=min(10.0, self.call_timeout))
                card = ModelCard.decode(info.get("card") if isinstance(info, dict) else None)
            except (LatticeError, RPCError, trio.TooSlowError, OSError) as exc:
                errors.append(f"{server.peer[-8:]}: {exc}")
                continue
            if card.model_id != self.model_id:
                errors.append(f"{server.peer[-8:]}: a card for {card.model_id!r}")
                continue
            self._card = card
            return card
        if not errors:
            raise NoChainError(self.model_id, [])
        raise MeshError(f"no server of {self.model_id} gave its model card ({'; '.join(errors[:3])})")

    async def tokenizer(self) -> Any:
        """The model's ``tokenizers.Tokenizer``, fetched (verified, size-bounded) through the content
        layer from the servers; cached."""
        if self._tokenizer is not None:
            return self._tokenizer
        card = await self.model_card()
        if card.tokenizer is None:
            raise MeshError(f"the servers of {self.model_id} publish no tokenizer (give token ids)")
        providers = [s.peer for s in (await self.servers())[:CARD_TRIES]]
        try:
            path = await self.node.content.get(
                card.tokenizer, providers=providers, max_size=MAX_TOKENIZER_BYTES
            )
        except LatticeError as exc:
            raise MeshError(f"cannot fetch the tokenizer of {self.model_id}: {exc}") from None
        self._tokenizer = await trio.to_thread.run_sync(_load_tokenizer, path)
        return self._tokenizer

    async def call(self, server: ServerInfo, method: str, payload: Any, timeout: float | None = None) -> Any:
        # node.connect reuses a live connection; otherwise it dials the announced addresses and
        # fails fast if they are dead (no DHT peer lookup of a server that just died)
        error: Exception = DialError(f"stage server {server.peer} announced no address")
        for addr in server.addrs:
            try:
                await self.node.connect(addr, timeout=min(5.0, self.call_timeout))
                break
            except (LatticeError, OSError, trio.TooSlowError) as exc:
                error = exc
        else:
            raise DialError(f"cannot reach stage server {server.peer}: {error}")
        return await self.node.rpc.call(server.peer, method, payload, timeout=timeout or self.call_timeout,
                                        as_torch=True)  # fmt: skip


class _HopState:
    def __init__(self, hop: Hop) -> None:
        self.hop = hop
        self.inputs: list[torch.Tensor] = []  # everything sent so far, in order (for replays)


class InferenceSession:
    """One sequence being generated through a chain; caches live on the stage servers."""

    def __init__(self, client: MeshClient) -> None:
        self.client = client
        self.id = secrets.token_hex(8)
        self.hops: list[_HopState] = []
        self.position = 0
        self.n_layers = 0
        self.dead: set[str] = set()
        self.recoveries: list[dict] = []  # one entry per re-routed hop: blocks, seconds, new peers

    async def __aenter__(self) -> InferenceSession:
        self.n_layers = await self.client.n_layers()
        self.hops = [_HopState(h) for h in await self.client.find_chain()]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def chain(self) -> list[Hop]:
        return [h.hop for h in self.hops]

    async def close(self) -> None:
        """Free the caches on the servers (best effort: they also expire)."""
        with trio.move_on_after(2.0):
            for h in self.hops:
                try:
                    await self.client.call(h.hop.server, "mesh.close", {"session": self.id}, timeout=1.0)
                except (LatticeError, trio.TooSlowError, OSError):
                    pass

    async def forward(self, tokens: Sequence[int] | torch.Tensor, logits: str = "last") -> torch.Tensor:
        """Feed ``tokens`` (appended to the sequence); returns logits, last position or all."""
        x = torch.as_tensor(tokens, dtype=torch.int64).reshape(1, -1)
        if x.shape[1] == 0:
            raise ValueError("no tokens to feed")
        i = 0
        while i < len(self.hops):
            state = self.hops[i]
            payload = {"session": self.id, "start": state.hop.start, "end": state.hop.end,
                       "pos": self.position, "inputs": [x], "want": "last", "logits": logits}  # fmt: skip
            try:
                reply = await self.client.call(state.hop.server, "mesh.forward", payload)
                y = _output(reply)
                state.inputs.append(x)
                i += 1
            except (RPCError, LatticeError, trio.TooSlowError, OSError) as exc:
                if isinstance(exc, RemoteError) and exc.type not in REROUTE_ERRORS:
                    raise
                log.info("hop %s failed (%s): re-routing", state.hop, exc)
                expired = isinstance(exc, RemoteError) and exc.type == "SessionError"  # server is fine
                y, added = await self._recover(i, x, logits, keep=expired, cause=exc)
                i += added
            x = y
        self.position += int(torch.as_tensor(tokens).numel())
        return x[0, -1] if logits == "last" else x[0]

    async def _recover(
        self, i: int, x: torch.Tensor, logits: str, keep: bool = False, cause: BaseException | None = None
    ) -> tuple[torch.Tensor, int]:
        """Replace hop ``i`` by servers for its blocks (the same one if ``keep``: it only lost our
        session), replaying its inputs; returns (output, number of hops that replace it)."""
        failed = self.hops[i]
        if not keep:
            self.dead.add(failed.hop.server.peer)
        t0 = time.monotonic()
        deadline = t0 + self.client.recover_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                chain = await self.client.find_chain(tuple(self.dead), failed.hop.start, failed.hop.end)
            except NoChainError as exc:
                last_error = exc
                await trio.sleep(0.2)
                self.client.forget_servers()
                continue
            history = [*failed.inputs, x]
            new_states = []
            try:
                for hop in chain:
                    is_last = hop.end == self.n_layers
                    payload = {"session": self.id, "start": hop.start, "end": hop.end, "pos": 0,
                               "inputs": history, "want": "last" if is_last else "all",
                               "logits": logits}  # fmt: skip
                    reply = await self.client.call(hop.server, "mesh.forward", payload)
                    state = _HopState(hop)
                    state.inputs = history[:-1]
                    new_states.append(state)
                    history = _outputs(reply, 1 if is_last else len(history))
            except (RPCError, LatticeError, trio.TooSlowError, OSError) as exc:
                if isinstance(exc, RemoteError) and exc.type not in REROUTE_ERRORS:
                    raise
                last_error = exc
                self.dead.add(hop.server.peer)
                continue
            self.hops[i : i + 1] = new_states
            self.recoveries.append({"blocks": (failed.hop.start, failed.hop.end),
                                    "seconds": round(time.monotonic() - t0, 4),
                                    "peers": [s.hop.server.peer for s in new_states]})  # fmt: skip
            return history[-1], len(new_states)
        a, b = failed.hop.start, failed.hop.end
        why = f"stage server {failed.hop.server.peer} (blocks {a}:{b}) failed ({cause or 'no answer'})"
        if isinstance(last_error, NoChainError):
            raise NoChainError(self.client.model_id, last_error.missing, cause=why)
        raise MeshError(f"could not re-route blocks {a}:{b} ({last_error}); {why}")

    async def generate(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        stop: Sequence[int] = (),
        sampling: Sampling | None = None,
    ) -> AsyncGenerator[int, None]:
        """Greedy decoding, or ``sampling``'s (the same seed gives the same tokens as
        :func:`~lattice.apps.mesh_inference.model.generate_local`): yields each new token as soon
        as it is known."""
        sampler = Sampler(sampling or Sampling(), prompt)
        logits = await self.forward(prompt)
        for n in range(max_new_tokens):
            token = sampler(logits)
            yield token
            if token in stop or n == max_new_tokens - 1:
                return
            logits = await self.forward([token])


def _load_tokenizer(path: Any) -> Any:
    """A tokenizer from its JSON file (a data format: nothing in it runs)."""
    from lattice.apps.mesh_inference.tokenizer import tokenizers_module

    with open(path, "rb") as fh:
        data = fh.read(MAX_TOKENIZER_BYTES + 1)
    if len(data) > MAX_TOKENIZER_BYTES:
        raise MeshError(f"the tokenizer is larger than {MAX_TOKENIZER_BYTES} bytes")
    try:
        return tokenizers_module().Tokenizer.from_str(data.decode())
    except Exception as exc:  # the library's parse errors have no common type
        raise MeshError(f"the servers' tokenizer is malformed: {str(exc)[:200]}") from None


def _outputs(reply: Any, count: int) -> list[torch.Tensor]:
    """The reply's ``count`` output tensors, checked (float32 [1, T, D] each)."""
    outs = reply.get("outputs") if isinstance(reply, dict) else None
    if not isinstance(outs, list) or len(outs) != count:
        raise MeshError("malformed mesh.forward reply")
    for y in outs:
        if not isinstance(y, torch.Tensor) or y.dtype != torch.float32 or y.dim() != 3 or y.shape[0] != 1:
            raise MeshError("mesh.forward replied with something that is not a float32 [1, T, D] tensor")
    return outs


def _output(reply: Any) -> torch.Tensor:
    return _outputs(reply, 1)[0]
