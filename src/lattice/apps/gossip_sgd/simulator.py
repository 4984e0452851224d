"""In-process gossip: N virtual peers, messages delivered in memory, bytes counted as on the wire.

The simulator drives the same algorithm generators as the network transport; it mixes with the
Metropolis-Hastings matrix of the round's graph (one matmul for all peers) and charges every
message ``compress.wire_bytes`` per neighbour, the size the RPC codec would put on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lattice.apps.gossip_sgd import topology
from lattice.apps.gossip_sgd.algorithms import NeedGrad, Round, Send
from lattice.apps.gossip_sgd.compress import lossy, wire_bytes


@dataclass
class SimReceived:
    w: Tensor  # [n, n] mixing matrix of the round
    graph: list[set[int]]
    raw: dict[str, Tensor]
    decoded: dict[str, Tensor]
    self_exact: bool
    refs: dict[str, Tensor]

    def sent(self, name: str) -> Tensor:
        return self.decoded[name]

    def mix(self, name: str) -> Tensor:
        dec = self.decoded[name]
        flat = dec.reshape(dec.shape[0], -1)
        off = self.w - torch.diag(torch.diag(self.w))
        own = (self.raw[name] if self.self_exact else dec).reshape(flat.shape)
        out = off @ flat + torch.diag(self.w)[:, None] * own
        return out.view(dec.shape)

    def neighbours(self, name: str) -> list[list[Tensor]]:
        dec = self.decoded[name]
        return [[dec[j] for j in sorted(nb)] for nb in self.graph]

    def mix_ref(self, name: str) -> Tensor:
        """W (ref + decoded): in memory every copy of a reference is exact."""
        new = self.refs[name] + self.decoded[name]
        return (self.w @ new.reshape(new.shape[0], -1)).view(new.shape)


class Simulator:
    """Delivers each :class:`Send` to every peer's neighbours in the graph of the current round.

    ``departures`` (peer -> round): the peer leaves the graph from that round on (its row keeps
    computing alone, as a dead process's last state would stay in memory); the graph is rebuilt over
    the others, as every network peer rebuilds it from the run's membership.
    """

    def __init__(
        self,
        n: int,
        kind: str = "ring",
        degree: int = 4,
        seed: int = 0,
        departures: dict[int, int] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.n, self.kind, self.degree, self.seed = n, kind, degree, seed
        self.device = torch.device(device)
        self.departures = dict(departures or {})
        self.bytes_sent = np.zeros(n, dtype=np.int64)
        self.messages = 0
        self._cache: dict[tuple, tuple[list[set[int]], Tensor]] = {}

    def live(self, round_: int) -> list[int]:
        return [i for i in range(self.n) if self.departures.get(i, round_ + 1) > round_]

    def graph(self, round_: int) -> tuple[list[set[int]], Tensor]:
        live = self.live(round_)
        key = (round_ if self.kind == "random" else 0, tuple(live))
        if key not in self._cache:
            sub = topology.build(self.kind, len(live), round_, self.degree, self.seed)
            g: list[set[int]] = [set() for _ in range(self.n)]
            for a, nb in enumerate(sub):
                g[live[a]] = {live[b] for b in nb}
            w = torch.tensor(topology.metropolis_hastings(g), dtype=torch.float32, device=self.device)
            self._cache = {key: (g, w)}
        return self._cache[key]

    def exchange(self, round_: int, send: Send) -> SimReceived:
        graph, w = self.graph(round_)
        degrees = np.array([len(nb) for nb in graph])
        decoded = {}
        for name, t in send.tensors.items():
            codec = send.codecs.get(name)
            flat = t.reshape(t.shape[0], -1)
            decoded[name] = lossy(codec, flat).view(t.shape)
            self.bytes_sent += degrees * wire_bytes(codec, flat.shape[1])
        self.messages += int(degrees.sum())
        return SimReceived(w, graph, dict(send.tensors), decoded, send.self_exact, dict(send.refs))


def drive(rounds: Round, exchange, oracle) -> None:
    """Run one round generator to completion: each Send answered with ``exchange(send)``, each
    NeedGrad with ``oracle(request)``."""
    value = None
    while True:
        try:
            request = rounds.send(value)
        except StopIteration:
            return
        value = oracle(request) if isinstance(request, NeedGrad) else exchange(request)
