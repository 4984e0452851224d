"""What a node is doing, from the counters its services already keep: one JSON snapshot (the web
page, ``lattice-node top``) and its Prometheus text rendering (``/metrics``).

Nothing here adds work on the hot path: the transport counts payload bytes per protocol, services
count their requests; a scrape only reads those counters. ``prometheus_client`` does the exposition
format (escaping, number formatting, content negotiation) from a registry of the node's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from lattice._version import __version__
from lattice.dht.service import DHT
from lattice.service import Reporting
from lattice.transport.host import Host

if TYPE_CHECKING:
    from lattice.config import NodeConfig
    from lattice.nat.manager import NATManager
    from lattice.observe.dashboard import Dashboard
    from lattice.swarm.profiles import SwarmProfile

__all__ = ["SnapshotCollector", "families", "prometheus", "registry", "snapshot"]

_REACHABILITY = ("public", "private", "unknown")
MAX_PEER_ROWS = 512
SHOWN = ("dht", "rpc", "crdt", "content")  # services whose stats() a snapshot shows


class Observed(Protocol):
    """What a snapshot reads of a node (lattice.node.Node, which imports this module)."""

    @property
    def host(self) -> Host | None: ...
    @property
    def services(self) -> Mapping[str, object]: ...
    @property
    def nat(self) -> NATManager | None: ...
    @property
    def config(self) -> NodeConfig: ...
    @property
    def swarm(self) -> SwarmProfile | None: ...
    @property
    def dashboard(self) -> Dashboard: ...
    @property
    def uptime(self) -> float: ...


def _peer_rows(host: Host, dht: DHT | None) -> list[dict]:
    """Connected peers (Host.peer_stats), then peers only in the DHT's routing table."""
    table = {c.peer: c for c in dht.table.contacts()} if dht is not None and dht.table is not None else {}
    rows: dict[Any, dict] = {}
    for peer in host.connected_peers()[:MAX_PEER_ROWS]:
        s = host.peer_stats(peer)
        if s is None:
            continue
        rows[peer] = {
            "peer_id": s["peer_id"],
            "connected": True,
            "in_dht": peer in table,
            "addr": s["addr"],
            "path": "relayed" if s["relayed"] else "direct",
            "direction": s["direction"],
            "reachability": "relayed" if any("/p2p-circuit" in a for a in s["listen_addrs"]) else "direct",
            "rtt_ms": s["rtt_ms"],
            "bytes_in": s["bytes_in"],
            "bytes_out": s["bytes_out"],
            "agent": s["agent"],
        }
    for peer, contact in table.items():
        if peer not in rows and len(rows) < MAX_PEER_ROWS:
            rows[peer] = {
                "peer_id": str(peer), "connected": False, "in_dht": True,
                "addr": str(contact.addrs[0]) if contact.addrs else "", "path": None, "direction": None,
                "reachability": "relayed" if any(a.is_relayed for a in contact.addrs) else "direct",
                "rtt_ms": None, "bytes_in": 0, "bytes_out": 0, "agent": "",
            }  # fmt: skip
    return list(rows.values())


def snapshot(node: Observed) -> dict:
    """The node's state as plain JSON-able data, composed of the host's and the services' stats()."""
    host = node.host
    assert host is not None, "the node is not running"
    h = host.stats()
    services = {name: s.stats() for name in SHOWN if isinstance(s := node.services.get(name), Reporting)}
    dht = node.services.get("dht")
    peers = _peer_rows(host, dht if isinstance(dht, DHT) else None)
    nat = node.nat
    cfg = node.config
    return {
        "time": time.time(),
        "peer_id": str(host.peer_id),
        "version": __version__,
        "swarm": node.swarm.swarm_id if node.swarm else None,
        "roles": [r for r, on in (("bootstrap", cfg.bootstrap_node), ("relay", cfg.relay)) if on],
        "uptime_s": round(node.uptime, 1),
        "reachability": nat.reachability if nat else "unknown",
        "relay_reservations": len(nat.autorelay.status()) if nat else 0,
        "swarm_size": 1 + len(peers),  # this node and every peer it is connected to or routes to
        "connected_peers": sum(1 for p in peers if p["connected"]),
        "connections": h["connections"],
        "bytes_in": h["bytes_in"],
        "bytes_out": h["bytes_out"],
        "traffic_in": h["traffic_in"],
        "traffic_out": h["traffic_out"],
        "host": h["events"],
        "peers": peers,
        "dht": services.get("dht"),
        "rpc": services.get("rpc"),
        "crdt": services.get("crdt"),
        "content": services.get("content"),
        "limits": h["limits"],
        "resources": h["resources"],
        "panels": node.dashboard.as_list(),
    }


def _family(
    kind: str, name: str, help_text: str, samples: Sequence[tuple[float, Mapping[str, Any]]]
) -> Metric:
    """One metric family (``kind`` gauge or counter) with its samples; label names from the first."""
    labels = list(samples[0][1]) if samples else []
    family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help_text, labels=labels)
    for value, lab in samples:
        family.add_metric([str(lab[k]) for k in labels], value)
    return family


def _gauge(name: str, help_text: str, value: float, **labels: Any) -> Metric:
    return _family("gauge", name, help_text, [(value, labels)])


def _counter(name: str, help_text: str, value: float, **labels: Any) -> Metric:
    return _family("counter", name, help_text, [(value, labels)])


def _in_out(kind: str, name: str, help_text: str, value_in: float, value_out: float) -> Metric:
    return _family(
        kind, name, help_text, [(value_in, {"direction": "in"}), (value_out, {"direction": "out"})]
    )


def families(snap: dict) -> Iterator[Metric]:
    """The metric families of a :func:`snapshot` (names and labels are the documented /metrics API)."""
    info = {"peer_id": snap["peer_id"], "swarm": snap["swarm"] or "", "version": snap["version"]}
    yield _gauge("lattice_info", "Node identity (value 1).", 1, **info)
    yield _gauge("lattice_uptime_seconds", "Seconds since the node started.", snap["uptime_s"])
    yield _gauge("lattice_peers_connected", "Connected peers.", snap["connected_peers"])
    yield _gauge(
        "lattice_swarm_known_peers",
        "This node plus peers it is connected to or routes to.",
        snap["swarm_size"],
    )
    yield _gauge("lattice_connections", "Open connections.", snap["connections"])
    yield _in_out(
        "gauge", "lattice_connection_bytes", "Bytes on open connections, by direction.",
        snap["bytes_in"], snap["bytes_out"],
    )  # fmt: skip
    traffic = [
        (n, {"protocol": proto, "direction": direction})
        for direction in ("in", "out")
        for proto, n in sorted(snap[f"traffic_{direction}"].items())
    ]
    if traffic:
        yield _family("counter", "lattice_protocol_bytes_total", "Stream payload bytes by protocol.", traffic)
    events = [(n, {"event": event}) for event, n in sorted(snap["host"].items())]
    if events:
        yield _family(
            "counter", "lattice_host_events_total", "Transport events (connections, refusals).", events
        )
    states = [(int(snap["reachability"] == state), {"state": state}) for state in _REACHABILITY]
    yield _family("gauge", "lattice_nat_reachability", "NAT reachability (1 for the current state).", states)
    yield _gauge("lattice_relay_reservations", "Relay reservations held.", snap["relay_reservations"])
    if snap["dht"] is not None:
        yield from _dht_families(snap["dht"])
    rpc = snap["rpc"]
    if rpc is not None:
        get = rpc.get
        yield _in_out("counter", "lattice_rpc_calls_total", "RPC calls, by direction.",
                      get("calls_in", 0), get("calls_out", 0))  # fmt: skip
        yield _in_out("counter", "lattice_rpc_errors_total", "Failed RPC calls, by direction.",
                      get("errors_in", 0), get("errors_out", 0))  # fmt: skip
        yield _counter("lattice_rpc_rejected_total", "RPC requests refused.", get("rejected", 0))
    crdt = snap["crdt"]
    if crdt is not None:
        for key in ("applied", "pushed", "synced", "rejected", "held", "invalid"):
            yield _counter(f"lattice_crdt_updates_{key}_total", f"CRDT updates {key}.", crdt.get(key, 0))
    if snap["limits"] is not None:
        yield from _limit_families(snap["limits"])
    if snap.get("resources") is not None:
        yield from _resource_families(snap["resources"])


def _dht_families(dht: dict) -> Iterator[Metric]:
    yield _gauge("lattice_dht_routing_table_peers", "Peers in the DHT routing table.", dht["routing_table"])
    yield _gauge("lattice_dht_records", "Records stored locally.", dht["records"])
    yield _gauge(
        "lattice_dht_stored_bytes", "Record bytes stored (against the store quota).", dht["stored_bytes"]
    )
    yield _in_out("counter", "lattice_dht_requests_total", "DHT requests, by direction.",
                  dht.get("requests_in", 0), dht.get("requests_out", 0))  # fmt: skip
    for key in ("failed_requests", "malformed", "rejected_records", "quota_refused"):
        yield _counter(f"lattice_dht_{key}_total", f"DHT {key.replace('_', ' ')}.", dht.get(key, 0))
    if dht["latency"]:
        help_text = "DHT operation latency (lookups, single requests)."
        summary = SummaryMetricFamily("lattice_dht_op_seconds", help_text, labels=["op"])
        for op, lat in sorted(dht["latency"].items()):
            summary.add_metric([op], count_value=lat["count"], sum_value=lat["sum_s"])
        yield summary


def _limit_families(limits: dict) -> Iterator[Metric]:
    yield _gauge("lattice_bans_active", "Peers and addresses banned now.", limits["banned"])
    yield _counter("lattice_bans_total", "Bans imposed.", limits["bans_total"])
    throttled = [(n, {"protocol": proto}) for proto, n in sorted(limits["throttled"].items())]
    if throttled:
        help_text = "Inbound streams refused by rate limits."
        yield _family("counter", "lattice_throttled_streams_total", help_text, throttled)
    help_text = "Connections refused (bans, per-IP caps)."
    yield _counter("lattice_refused_connections_total", help_text, limits["refused_connections"])


def _resource_families(res: dict) -> Iterator[Metric]:
    node = res["node"]
    memory = [(node["memory"], {"scope": "node", "holder": "node"})]
    for scope, rows in (("peer", res["peers"]), ("prefix", res["prefixes"])):
        memory += [(row["memory"], {"scope": scope, "holder": row["name"]}) for row in rows]
    memory += [
        (row["memory"], {"scope": "service", "holder": name}) for name, row in sorted(res["services"].items())
    ]
    yield _family(
        "gauge", "lattice_resource_memory_bytes", "Memory reserved from the budgets, by holder.", memory
    )
    yield _gauge("lattice_resource_memory_limit_bytes", "The node's memory budget.", node["memory_limit"])
    for what in ("connections", "streams", "pending_handshakes"):
        yield _gauge(f"lattice_resource_{what}", f"Open {what.replace('_', ' ')} (budgeted).", node[what])
    refusals = [(n, {"scope": key.partition(":")[0], "resource": key.partition(":")[2]})
                for key, n in sorted(res["refusals"].items())]  # fmt: skip
    if refusals:
        yield _family(
            "counter", "lattice_resource_refusals_total", "Reservations refused, by scope.", refusals
        )
    yield _counter("lattice_resource_evicted_handshakes_total", "Pending handshakes evicted for newcomers.",
                   res["evicted_handshakes"])  # fmt: skip
    yield _counter("lattice_resource_dropped_replies_total", "Replies dropped because the peer did not read.",
                   res["dropped_replies"])  # fmt: skip


class SnapshotCollector(Collector):
    """A prometheus_client collector that reads the node's counters at scrape time (nothing is
    updated on the hot path; the registry only formats what :func:`snapshot` returns)."""

    def __init__(self, source: Callable[[], dict]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        yield from families(self._source())


def registry(source: Callable[[], dict]) -> CollectorRegistry:
    """A registry of its own per node (not the process-global one: tests run several nodes in one
    process, and an embedding application keeps its own metrics apart)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(source))
    return reg


def prometheus(snap: dict) -> str:
    """Prometheus text exposition format (version 0.0.4) of a :func:`snapshot`."""
    return generate_latest(registry(lambda: snap)).decode()
