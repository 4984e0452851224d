"""What a service (RPC, DHT, pubsub, CRDT, content, or an app's own) is given by the node that runs
it: a narrow, typed context, never the node itself. A service registers its protocol handlers on
``ctx.host``, its control operations with ``ctx.add_control_op``, keeps its files under
``ctx.data_dir`` and finds the other services it builds on with ``ctx.service(name, kind)``.

    class Echo:
        name = "echo"

        async def run(self, ctx: ServiceContext, task_status=trio.TASK_STATUS_IGNORED) -> None:
            ctx.host.set_stream_handler("/echo/1.0.0", self._handle)
            task_status.started()
            await trio.sleep_forever()

Settings that come from the node's configuration are given to a service when it is built (the
node's composition root does that for the built-in ones: ``lattice.node.default_services``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import trio

from lattice.identity import PeerId
from lattice.transport.host import Host
from lattice.transport.peerstore import PeerInfo

__all__ = ["Reporting", "Service", "ServiceContext"]

T = TypeVar("T")


class Service(Protocol):
    """A service: started with the node (``run`` until cancelled), stopped with it."""

    name: str

    async def run(self, ctx: ServiceContext, task_status: trio.TaskStatus = ...) -> None:
        """Run until cancelled; call ``task_status.started()`` once usable."""


@runtime_checkable
class Reporting(Protocol):
    """A service (or the host) that reports its state: counters and gauges, cheap to compute."""

    def stats(self) -> dict[str, Any]:
        """JSON-able; what status pages and /metrics compose (lattice.observe.metrics)."""
        ...


def _admit_all(info: PeerInfo) -> bool:
    return True


def _ignore(peer: PeerId) -> None:
    return None


@dataclass(frozen=True)
class ServiceContext:
    host: Host
    data_dir: Path  # the node's data directory; a service keeps its files in a subdirectory
    add_control_op: Callable[[str, Callable[..., Any]], None]  # expose an op on the control API
    services: Mapping[str, object] = field(default_factory=dict)  # the node's services, by name
    # may a peer enter routing tables and meshes? (the swarm guard: peers of another swarm may not)
    admit: Callable[[PeerInfo], bool] = _admit_all
    # protocol ids the swarm profile chooses (e.g. "kad": the DHT's); a service's own config wins
    protocol_ids: Mapping[str, str] = field(default_factory=dict)
    # keep a connection to this peer up (re-dialed at once when lost): replicas, partners
    keep_connected: Callable[[PeerId], None] = _ignore

    def service(self, name: str, kind: type[T]) -> T | None:
        """The node's service ``name`` if it runs and is a ``kind``, else None."""
        found = self.services.get(name)
        return found if isinstance(found, kind) else None
