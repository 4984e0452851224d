"""What a node is doing, from the counters its services already keep: one JSON snapshot (the web
page, ``lattice-node top``) and its Prometheus text rendering (``/metrics``).

Nothing here adds work on the hot path: the transport counts payload bytes per protocol, services
count their requests; a scrape only reads those counters.
"""

from __future__ import annotations

import time
from typing import Any

from lattice import __version__

__all__ = ["prometheus", "snapshot"]

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
            "records": dht.store.record_count if dht.store is not None else 0,
            "protocol": dht.config.protocol_id,
            **{k: v for k, v in dht.stats.items() if isinstance(v, int | float)},
            "latency": {op: {"count": c, "sum_s": round(s, 6)} for op, (c, s) in dht.latency.items()},
        },
        "rpc": dict(rpc.stats) if rpc is not None and hasattr(rpc, "stats") else None,
        "crdt": dict(crdt.stats) if crdt is not None and hasattr(crdt, "stats") else None,
        "limits": limits.status() if limits is not None else None,
        "panels": node.dashboard.as_list() if getattr(node, "dashboard", None) else [],
    }


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.seen: set[str] = set()

    def metric(self, name: str, kind: str, help_text: str, value: float, **labels: Any) -> None:
        if name not in self.seen:
            self.seen.add(name)
            self.lines.append(f"# HELP {name} {help_text}")
            self.lines.append(f"# TYPE {name} {kind}")
        self.sample(name, value, **labels)

    def sample(self, name: str, value: float, **labels: Any) -> None:
        text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        self.lines.append(f"{name}{{{text}}} {value}" if text else f"{name} {value}")


def prometheus(snap: dict) -> str:
    """Prometheus text exposition format (version 0.0.4) of a :func:`snapshot`."""
    w = _Writer()
    w.metric("lattice_info", "gauge", "Node identity (value 1).", 1, peer_id=snap["peer_id"],
             swarm=snap["swarm"] or "", version=snap["version"])  # fmt: skip
    w.metric("lattice_uptime_seconds", "gauge", "Seconds since the node started.", snap["uptime_s"])
    w.metric("lattice_peers_connected", "gauge", "Connected peers.", snap["connected_peers"])
    w.metric("lattice_swarm_known_peers", "gauge", "This node plus peers it is connected to or routes to.",
             snap["swarm_size"])  # fmt: skip
    w.metric("lattice_connections", "gauge", "Open connections.", snap["connections"])
    w.metric("lattice_connection_bytes", "gauge", "Bytes on open connections, by direction.",
             snap["bytes_in"], direction="in")  # fmt: skip
    w.sample("lattice_connection_bytes", snap["bytes_out"], direction="out")
    first = True
    for direction in ("in", "out"):
        for proto, n in sorted(snap[f"traffic_{direction}"].items()):
            if first:
                w.metric("lattice_protocol_bytes_total", "counter", "Stream payload bytes by protocol.",
                         n, protocol=proto, direction=direction)  # fmt: skip
                first = False
            else:
                w.sample("lattice_protocol_bytes_total", n, protocol=proto, direction=direction)
    for event, n in sorted(snap["host"].items()):
        w.metric("lattice_host_events_total", "counter", "Transport events (connections, refusals).",
                 n, event=event)  # fmt: skip
    for state in _REACHABILITY:
        w.metric("lattice_nat_reachability", "gauge", "NAT reachability (1 for the current state).",
                 int(snap["reachability"] == state), state=state)  # fmt: skip
    w.metric("lattice_relay_reservations", "gauge", "Relay reservations held.", snap["relay_reservations"])
    dht = snap["dht"]
    if dht is not None:
        w.metric("lattice_dht_routing_table_peers", "gauge", "Peers in the DHT routing table.",
                 dht["routing_table"])  # fmt: skip
        w.metric("lattice_dht_records", "gauge", "Records stored locally.", dht["records"])
        w.metric("lattice_dht_requests_total", "counter", "DHT requests, by direction.",
                 dht.get("requests_in", 0), direction="in")  # fmt: skip
        w.sample("lattice_dht_requests_total", dht.get("requests_out", 0), direction="out")
        for key in ("failed_requests", "malformed", "rejected_records"):
            w.metric(f"lattice_dht_{key}_total", "counter", f"DHT {key.replace('_', ' ')}.", dht.get(key, 0))
        if dht["latency"]:
            w.lines += ["# HELP lattice_dht_op_seconds DHT operation latency (lookups, single requests).",
                        "# TYPE lattice_dht_op_seconds summary"]  # fmt: skip
        for op, lat in sorted(dht["latency"].items()):
            w.sample("lattice_dht_op_seconds_count", lat["count"], op=op)
            w.sample("lattice_dht_op_seconds_sum", lat["sum_s"], op=op)
    rpc = snap["rpc"]
    if rpc is not None:
        w.metric("lattice_rpc_calls_total", "counter", "RPC calls, by direction.", rpc.get("calls_in", 0),
                 direction="in")  # fmt: skip
        w.sample("lattice_rpc_calls_total", rpc.get("calls_out", 0), direction="out")
        w.metric("lattice_rpc_errors_total", "counter", "Failed RPC calls, by direction.",
                 rpc.get("errors_in", 0), direction="in")  # fmt: skip
        w.sample("lattice_rpc_errors_total", rpc.get("errors_out", 0), direction="out")
        w.metric("lattice_rpc_rejected_total", "counter", "RPC requests refused.", rpc.get("rejected", 0))
    crdt = snap["crdt"]
    if crdt is not None:
        for key in ("applied", "pushed", "synced", "rejected", "held", "invalid"):
            w.metric(f"lattice_crdt_updates_{key}_total", "counter", f"CRDT updates {key}.", crdt.get(key, 0))
    limits = snap["limits"]
    if limits is not None:
        w.metric("lattice_bans_active", "gauge", "Peers and addresses banned now.", limits["banned"])
        w.metric("lattice_bans_total", "counter", "Bans imposed.", limits["bans_total"])
        for proto, n in sorted(limits["throttled"].items()):
            w.metric("lattice_throttled_streams_total", "counter", "Inbound streams refused by rate limits.",
                     n, protocol=proto)  # fmt: skip
        w.metric("lattice_refused_connections_total", "counter", "Connections refused (bans, per-IP caps).",
                 limits["refused_connections"])  # fmt: skip
    return "\n".join(w.lines) + "\n"
