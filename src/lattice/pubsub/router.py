"""The gossipsub mesh as a sans-IO state machine: events in (peer joined/left, RPC received,
heartbeat, publish), RPCs out (:meth:`GossipRouter.drain`), messages to deliver returned.

Per topic each peer keeps a mesh of about ``D`` peers (between ``D_LO`` and ``D_HI``, repaired every
heartbeat with GRAFT/PRUNE); a new message is forwarded to the mesh only, once (a seen-message cache
drops duplicates), after the application accepted it. Our own messages go to every peer subscribed to
the topic (flood publish, as gossipsub v1.1 does by default), so the first hop costs no mesh delay.
At every heartbeat the ids of recent messages are gossiped (IHAVE) to ``D_LAZY`` peers outside the
mesh, which ask for what they missed (IWANT): a peer on a broken mesh path still gets everything.
Time is passed in (``now``), so tests are deterministic.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from .protocol import RPC, Message

Peer = TypeVar("Peer", bound=Hashable)  # a peer id on the network, anything hashable in tests

D, D_LO, D_HI, D_LAZY = 6, 4, 12, 6
HEARTBEAT = 1.0
HISTORY_LENGTH, HISTORY_GOSSIP = 5, 3  # heartbeats a message stays in the cache / is gossiped
SEEN_TTL = 120.0
MAX_SEEN = 200_000
PRUNE_BACKOFF = 60
FANOUT_TTL = 60.0
MAX_IHAVE_IDS = 5000  # ids we ask one peer for per heartbeat (gossipsub v1.1's max_ihave_length)
MAX_IHAVE_MESSAGES = 10  # IHAVE messages of one peer we follow per heartbeat (max_ihave_messages)
MAX_IWANT_REPLIES = 3  # times one message is served to one peer through IWANT
MAX_IWANT_BYTES = 256 * 1024  # message bytes served for one IWANT ...
MAX_IWANT_BYTES_PER_HEARTBEAT = 1 << 20  # ... and to one peer per heartbeat (no amplification)
MAX_PEER_TOPICS = 256  # topics one peer may be subscribed to, as far as we keep track
MAX_BACKOFF = 3600.0  # a PRUNE's backoff is capped (a peer chooses it)


class GossipRouter(Generic[Peer]):
    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self.topics: set[str] = set()  # ours
        self.peer_topics: dict[Peer, set[str]] = {}
        self.mesh: dict[str, set[Peer]] = {}
        self.fanout: dict[str, set[Peer]] = {}
        self._fanout_used: dict[str, float] = {}
        self._backoff: dict[tuple[str, Peer], float] = {}
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._cache: dict[bytes, Message] = {}
        self._windows: list[list[bytes]] = [[]]
        self._served: dict[tuple[Peer, bytes], int] = {}
        # per peer, this heartbeat: IHAVE messages followed, ids asked for, IWANT bytes served
        self._ihave_seen: dict[Peer, int] = {}
        self._asked: dict[Peer, int] = {}
        self._iwant_bytes: dict[Peer, int] = {}
        self._out: dict[Peer, RPC] = {}
        self.stats = {"delivered": 0, "duplicates": 0, "forwarded": 0, "rejected": 0, "iwant_served": 0}

    # ---- outputs
    def _rpc(self, peer: Peer) -> RPC:
        rpc = self._out.get(peer)
        if rpc is None:
            rpc = self._out[peer] = RPC()
        return rpc

    def drain(self) -> list[tuple[Peer, RPC]]:
        """The RPCs to send now, one per peer (everything queued since the last drain)."""
        out = [(p, r) for p, r in self._out.items() if not r.empty()]
        self._out = {}
        return out

    # ---- peers and subscriptions
    def add_peer(self, peer: Peer) -> None:
        if peer in self.peer_topics:
            return
        self.peer_topics[peer] = set()
        if self.topics:
            self._rpc(peer).subscriptions += [(True, t) for t in sorted(self.topics)]

    def remove_peer(self, peer: Peer) -> None:
        self.peer_topics.pop(peer, None)
        for peers in (*self.mesh.values(), *self.fanout.values()):
            peers.discard(peer)
        self._out.pop(peer, None)
        for table in (self._ihave_seen, self._asked, self._iwant_bytes):
            table.pop(peer, None)
        self._backoff = {k: t for k, t in self._backoff.items() if k[1] != peer}

    def subscribe(self, topic: str) -> None:
        if topic in self.topics:
            return
        self.topics.add(topic)
        for peer in self.peer_topics:
            self._rpc(peer).subscriptions.append((True, topic))
        mesh = self.mesh[topic] = set(self.fanout.pop(topic, set()))
        self._fanout_used.pop(topic, None)
        self._fill(topic, mesh, D)

    def unsubscribe(self, topic: str) -> None:
        if topic not in self.topics:
            return
        self.topics.discard(topic)
        for peer in self.peer_topics:
            self._rpc(peer).subscriptions.append((False, topic))
        for peer in self.mesh.pop(topic, set()):
            self._rpc(peer).prune.append((topic, PRUNE_BACKOFF))

    def _candidates(self, topic: str, exclude: set[Peer], now: float = 0.0) -> list[Peer]:
        out = [
            p
            for p, topics in self.peer_topics.items()
            if topic in topics and p not in exclude and self._backoff.get((topic, p), 0.0) <= now
        ]
        self.rng.shuffle(out)
        return out

    def _fill(self, topic: str, mesh: set[Peer], target: int, now: float = 0.0) -> None:
        for peer in self._candidates(topic, mesh, now)[: max(0, target - len(mesh))]:
            mesh.add(peer)
            self._rpc(peer).graft.append(topic)

    # ---- messages
    def publish(self, topic: str, data: bytes, now: float, message: Message | None = None) -> bytes:
        """Send our own message (to every peer subscribed to the topic); returns its id. ``message``:
        a prebuilt (signed) message for ``topic``; by default an unsigned one carrying ``data``."""
        message = message or Message(topic, data)
        self._remember(message, now)
        targets = [p for p, topics in self.peer_topics.items() if topic in topics]
        if topic not in self.topics:
            self._fanout_used[topic] = now
        for peer in targets:
            self._rpc(peer).messages.append(message)
        return message.id

    def handle(
        self, peer: Peer, rpc: RPC, now: float, validate: Callable[[Peer, Message], bool] | None = None
    ) -> list[Message]:
        """Process an RPC from ``peer``; returns the new messages it delivered to us (after
        ``validate`` accepted them; rejected ones are neither delivered nor forwarded)."""
        if peer not in self.peer_topics:
            self.add_peer(peer)
        topics = self.peer_topics[peer]
        for subscribe, topic in rpc.subscriptions:
            if subscribe:
                if len(topics) >= MAX_PEER_TOPICS and topic not in topics:
                    self.stats["ignored_subscriptions"] = self.stats.get("ignored_subscriptions", 0) + 1
                    continue  # a peer claiming thousands of topics is not tracked beyond the cap
                topics.add(topic)
                mesh = self.mesh.get(topic)
                if mesh is not None and len(mesh) < D and self._backoff.get((topic, peer), 0.0) <= now:
                    mesh.add(peer)  # a short mesh takes a new subscriber at once, not at the heartbeat
                    self._rpc(peer).graft.append(topic)
            else:
                topics.discard(topic)
                if topic in self.mesh:
                    self.mesh[topic].discard(peer)
        delivered = []
        for message in rpc.messages:
            mid = message.id
            if mid in self._seen:
                self.stats["duplicates"] += 1
                continue
            if message.topic not in self.topics:
                continue  # not ours: nothing to deliver or forward (fanout peers forward their own)
            if validate is not None and not validate(peer, message):
                self.stats["rejected"] += 1  # not marked seen: a forgery cannot pre-empt the real id
                continue
            self._remember(message, now)
            delivered.append(message)
            self.stats["delivered"] += 1
            author = message.from_
            for other in self.mesh.get(message.topic, ()):
                if other == peer or (author is not None and getattr(other, "multihash", None) == author):
                    continue  # not back to where it came from, nor to its author
                self._rpc(other).messages.append(message)
                self.stats["forwarded"] += 1
        self._control(peer, rpc, now)
        return delivered

    def _control(self, peer: Peer, rpc: RPC, now: float) -> None:
        self._ask(peer, rpc)
        self._serve(peer, rpc)
        for topic in rpc.graft:
            mesh = self.mesh.get(topic)
            if mesh is None or self._backoff.get((topic, peer), 0.0) > now:
                self._rpc(peer).prune.append((topic, PRUNE_BACKOFF))
            elif len(mesh) < D_HI:
                mesh.add(peer)
            else:
                self._rpc(peer).prune.append((topic, PRUNE_BACKOFF))
        for topic, backoff in rpc.prune:
            if topic in self.mesh:  # a backoff only matters (and is only kept) for our topics
                self.mesh[topic].discard(peer)
                self._backoff[(topic, peer)] = now + min(backoff or PRUNE_BACKOFF, MAX_BACKOFF)

    def _ask(self, peer: Peer, rpc: RPC) -> None:
        """IWANT what ``peer`` has that we miss, within its per-heartbeat allowance: a peer sending
        IHAVEs of ids it never delivers cannot make us ask for more than MAX_IHAVE_IDS."""
        if not rpc.ihave:
            return
        followed = self._ihave_seen.get(peer, 0)
        room = MAX_IHAVE_IDS - self._asked.get(peer, 0)
        wanted: list[bytes] = []
        for topic, ids in rpc.ihave:
            if followed >= MAX_IHAVE_MESSAGES or room <= len(wanted):
                break
            followed += 1
            if topic in self.topics:
                wanted += [i for i in ids if i not in self._seen]
        self._ihave_seen[peer] = followed
        wanted = wanted[: max(0, room)]
        if wanted:
            self._asked[peer] = self._asked.get(peer, 0) + len(wanted)
            self._rpc(peer).iwant += wanted

    def _serve(self, peer: Peer, rpc: RPC) -> None:
        """Messages for ``peer``'s IWANT, from the cache: each at most MAX_IWANT_REPLIES times, at
        most MAX_IWANT_BYTES per IWANT and MAX_IWANT_BYTES_PER_HEARTBEAT per peer."""
        if not rpc.iwant:
            return
        budget = min(MAX_IWANT_BYTES, MAX_IWANT_BYTES_PER_HEARTBEAT - self._iwant_bytes.get(peer, 0))
        spent = 0
        for mid in rpc.iwant:
            message = self._cache.get(mid)
            key = (peer, mid)
            if message is None or self._served.get(key, 0) >= MAX_IWANT_REPLIES:
                continue
            size = len(message.data) + len(message.topic) + 16
            if spent + size > budget:
                break  # the rest is asked again after the next IHAVE
            spent += size
            self._served[key] = self._served.get(key, 0) + 1
            self._rpc(peer).messages.append(message)
            self.stats["iwant_served"] += 1
        if spent:
            self._iwant_bytes[peer] = self._iwant_bytes.get(peer, 0) + spent

    def _remember(self, message: Message, now: float) -> None:
        mid = message.id
        self._seen[mid] = now
        while len(self._seen) > MAX_SEEN:
            self._seen.popitem(last=False)
        self._cache[mid] = message
        self._windows[0].append(mid)

    # ---- heartbeat
    def heartbeat(self, now: float) -> None:
        """Repair meshes, expire fanout, gossip recent ids, age the caches."""
        for topic, mesh in self.mesh.items():
            for peer in [p for p in mesh if topic not in self.peer_topics.get(p, ())]:
                mesh.discard(peer)
            if len(mesh) < D_LO:
                self._fill(topic, mesh, D, now)
            elif len(mesh) > D_HI:
                keep = set(self.rng.sample(sorted(mesh, key=repr), D))
                for peer in mesh - keep:
                    self._rpc(peer).prune.append((topic, PRUNE_BACKOFF))
                    self._backoff[(topic, peer)] = now + PRUNE_BACKOFF
                mesh &= keep
        for topic in [t for t, used in self._fanout_used.items() if now - used > FANOUT_TTL]:
            self._fanout_used.pop(topic, None)
            self.fanout.pop(topic, None)
        self._gossip()
        self._windows.insert(0, [])
        for mid in self._windows.pop() if len(self._windows) > HISTORY_LENGTH else ():
            self._cache.pop(mid, None)
        while self._seen and next(iter(self._seen.values())) < now - SEEN_TTL:
            self._seen.popitem(last=False)
        self._backoff = {k: t for k, t in self._backoff.items() if t > now}
        self._served.clear()
        self._ihave_seen.clear()
        self._asked.clear()
        self._iwant_bytes.clear()

    def _gossip(self) -> None:
        recent: dict[str, list[bytes]] = {}
        for window in self._windows[:HISTORY_GOSSIP]:
            for mid in window:
                message = self._cache.get(mid)
                if message is not None:
                    recent.setdefault(message.topic, []).append(mid)
        for topic, ids in recent.items():
            if topic not in self.topics:
                continue
            exclude = self.mesh.get(topic, set())
            for peer in self._candidates(topic, exclude, float("inf"))[:D_LAZY]:
                self._rpc(peer).ihave.append((topic, ids[-MAX_IHAVE_IDS:]))


__all__ = ["D_HI", "D_LAZY", "D_LO", "HEARTBEAT", "D", "GossipRouter"]
