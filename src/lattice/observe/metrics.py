"""What a node is doing, from the counters its services already keep: one JSON snapshot (the web
page, ``lattice-node top``) and its Prometheus text rendering (``/metrics``).

Nothing here adds work on the hot path: the transport counts payload bytes per protocol, services
count their requests; a scrape only reads those counters. ``prometheus_client`` does the exposition
format (escaping, number formatting, content negotiation) from a registry of the node's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from lattice._version import __version__

__all__ = ["SnapshotCollector", "families", "prometheus", "registry", "snapshot"]

_REACHABILITY = ("public", "private", "unknown")
MAX_PEER_ROWS = 512


def _proto_name(proto: str | None) -> str:
    return proto if proto is not None else "negotiation"


def _peer_rows(node: Any) -> list[dict]:
    host = node.host
    dht = node.services.get("dht")
    table = {c.peer: c for c in dht.table.contacts()} if dht is not None and dht.table is not None else {}
    rows: dict[Any, dict] = {}
    for peer in host.connected_peers()[:MAX_PEER_ROWS]:
        conn = host.connection_to(peer)
        if conn is None:
            continue
        info = host.peerstore.get(peer)
        listen = info.addrs if info else []
        rows[peer] = {
            "peer_id": str(peer),
            "connected": True,
            "in_dht": peer in table,
            "addr": str(conn.remote_addr),
            "path": "relayed" if conn.relayed else "direct",
            "direction": conn.direction,
            "reachability": "relayed" if any(a.is_relayed for a in listen) else "direct",
            "rtt_ms": round(conn.rtt * 1000, 3) if conn.rtt is not None else None,
            "bytes_in": sum(c.session.bytes_received for c in host._conns.get(peer, ())),
            "bytes_out": sum(c.session.bytes_sent for c in host._conns.get(peer, ())),
            "agent": info.agent_version if info else "",
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


def snapshot(node: Any) -> dict:
    """The node's state as plain JSON-able data."""
    host = node.host
    conns = host.connections()
    peers = _peer_rows(node)
    dht = node.services.get("dht")
    rpc = node.services.get("rpc")
    crdt = node.services.get("crdt")
    limits = getattr(host, "limits", None)
    nat = node.nat
    cfg = node.config
    return {
        "time": time.time(),
        "peer_id": str(host.peer_id),
        "version": __version__,
        "swarm": node.swarm.swarm_id if node.swarm else None,
        "roles": [r for r, on in (("bootstrap", cfg.bootstrap_node), ("relay", cfg.relay)) if on],
        "uptime_s": round(time.time() - node._started_at, 1) if node._started_at else 0.0,
        "reachability": nat.reachability if nat else "unknown",
        "relay_reservations": len(nat.autorelay.status()) if nat else 0,
        "swarm_size": 1 + len(peers),  # this node and every peer it is connected to or routes to
        "connected_peers": sum(1 for p in peers if p["connected"]),
        "connections": len(conns),
        "bytes_in": sum(c.session.bytes_received for c in conns),
        "bytes_out": sum(c.session.bytes_sent for c in conns),
        "traffic_in": {_proto_name(k): v for k, v in host.traffic_in.items()},
        "traffic_out": {_proto_name(k): v for k, v in host.traffic_out.items()},
        "host": dict(host.stats),
        "peers": peers,
        "dht": None
        if dht is None
        else {
            "routing_table": len(dht.table) if dht.table is not None else 0,
            **dht.store_status(),
            "protocol": dht.protocol_id,
            **{k: v for k, v in dht.stats.items() if isinstance(v, int | float)},
            "latency": {op: {"count": c, "sum_s": round(s, 6)} for op, (c, s) in dht.latency.items()},
        },
        "rpc": dict(rpc.stats) if rpc is not None and hasattr(rpc, "stats") else None,
        "crdt": dict(crdt.stats) if crdt is not None and hasattr(crdt, "stats") else None,
        "limits": limits.status() if limits is not None else None,
        "resources": host.resource_stats(),
        "panels": node.dashboard.as_list() if getattr(node, "dashboard", None) else [],
    }


def _family(kind: str, name: str, help_text: str, samples: list[tuple[float, dict[str, Any]]]) -> Metric:
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
