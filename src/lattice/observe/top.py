"""``lattice-node top``: a live view of one daemon (peers, traffic per protocol, DHT, RPC, CRDT,
limits), refreshed from its ``metrics`` control op; rates come from two consecutive snapshots."""

from __future__ import annotations

import time
from typing import Any

__all__ = ["render", "run_top"]


def _rate(new: float, old: float | None, seconds: float) -> str:
    if old is None or seconds <= 0:
        return "-"
    return _bytes((new - old) / seconds) + "/s"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def render(snap: dict, prev: dict | None = None) -> Any:
    """A rich renderable of one snapshot (with rates against ``prev``). Every cell is an inert Text
    (lattice.observe.inert): peer ids, protocol names and counters' keys may come from remote peers."""
    from rich.console import Group
    from rich.table import Table

    from lattice.observe.inert import inert_text

    dt = snap["time"] - prev["time"] if prev else 0.0
    old_peers = {p["peer_id"]: p for p in prev["peers"]} if prev else {}
    roles = ", ".join(snap["roles"]) or "node"
    head = Table.grid(padding=(0, 2))
    head.add_row(
        inert_text(snap["peer_id"], "bold"), inert_text(f"swarm {snap['swarm']}"), inert_text(roles),
        f"up {snap['uptime_s']:.0f} s", inert_text(f"reachability {snap['reachability']}"),
    )  # fmt: skip
    limits = snap.get("limits") or {}
    head.add_row(
        f"swarm size {snap['swarm_size']}", f"connected {snap['connected_peers']}",
        f"in {_rate(snap['bytes_in'], prev['bytes_in'] if prev else None, dt)}",
        f"out {_rate(snap['bytes_out'], prev['bytes_out'] if prev else None, dt)}",
        f"banned {limits.get('banned', 0)}",
    )  # fmt: skip
    peers = Table(title="peers", expand=True)
    for col in ("peer", "path", "rtt ms", "in", "out", "in/s", "dht"):
        peers.add_column(col, overflow="fold")
    rows = sorted(snap["peers"], key=lambda p: -(p["bytes_in"] + p["bytes_out"]))
    for p in rows[:40]:
        old = old_peers.get(p["peer_id"])
        rtt = "" if p["rtt_ms"] is None else f"{p['rtt_ms']:.2f}"
        rate = _rate(p["bytes_in"], old["bytes_in"] if old else None, dt)
        peers.add_row(
            inert_text(p["peer_id"][-12:]), inert_text(p["path"] or "not connected"), rtt,
            _bytes(p["bytes_in"]), _bytes(p["bytes_out"]), rate, "yes" if p["in_dht"] else "",
        )  # fmt: skip
    protos = Table(title="traffic by protocol")
    for col in ("protocol", "in", "out"):
        protos.add_column(col)
    names = sorted(set(snap["traffic_in"]) | set(snap["traffic_out"]))
    for name in names:
        protos.add_row(
            inert_text(name),
            _bytes(snap["traffic_in"].get(name, 0)),
            _bytes(snap["traffic_out"].get(name, 0)),
        )
    services = Table(title="services")
    services.add_column("service")
    services.add_column("counters", overflow="fold")
    dht = snap.get("dht") or {}
    if dht:
        lat = ", ".join(
            f"{op} {v['count']}x {1000 * v['sum_s'] / max(v['count'], 1):.1f} ms"
            for op, v in dht["latency"].items()
        )
        counts = f"in {dht.get('requests_in', 0)}, out {dht.get('requests_out', 0)}"
        services.add_row(
            "dht", inert_text(f"table {dht['routing_table']}, records {dht['records']}, {counts}; {lat}")
        )
    for name in ("rpc", "crdt"):
        if snap.get(name):
            services.add_row(name, inert_text(", ".join(f"{k} {v}" for k, v in snap[name].items())))
    if limits:
        throttled = ", ".join(f"{k} {v}" for k, v in limits["throttled"].items()) or "none"
        bans = f"banned {limits['banned']} (total {limits['bans_total']})"
        refused = f"refused conns {limits['refused_connections']}"
        services.add_row("limits", inert_text(f"{bans}, {refused}, throttled: {throttled}"))
    return Group(head, peers, protos, services)


def run_top(client: Any, interval: float = 1.0, count: int | None = None) -> None:
    """Refresh every ``interval`` seconds until Ctrl-C (or ``count`` frames)."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    prev = None
    if count is not None and count <= 1:
        console.print(render(client.call("metrics")))
        return
    frames = 0
    with Live(console=console, refresh_per_second=4, screen=False) as live:
        while count is None or frames < count:
            snap = client.call("metrics")
            live.update(render(snap, prev))
            prev = snap
            frames += 1
            if count is None or frames < count:
                time.sleep(interval)
