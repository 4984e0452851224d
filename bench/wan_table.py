"""bench/wan_table: bench/wan.py's JSON lines as one markdown table per preset (docs/perf.md).

    python bench/wan_table.py RUN.jsonl [RUN2.jsonl ...]

Rows are figures, columns systems (ours, the anchors, plain TCP); each cell the median, in link
RTTs or fractions of the link rate as bench/wan.py reports them (DHT cells add the median in ms
and, where measured, the CPU the whole swarm spent per operation).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable

SYSTEMS = ("lattice", "lattica", "hivemind", "plain-tcp")
RPC_ROWS = (
    ("rpc_up_64mib_link_fraction", "RPC 64 MiB up, fraction of the link"),
    ("rpc_up_64mib_raw_link_fraction", "  same, hivemind's raw byte stream"),
    ("small_call_rtts", "small call, link RTTs"),
)
DHT_ROWS = (
    ("dht_store_rtts", "DHT store, RTTs"),
    ("dht_get_lookup_rtts", "DHT get by a non-replica, RTTs"),
    ("dht_get_rtts", "DHT get through any node, RTTs"),
)


def cell(line: dict | None) -> str:
    if line is None:
        return "-"
    text = f"{line['median']:.2f}"
    if "median_ms" in line:
        cpu = f", CPU {line['cpu_ms_per_op']:.0f} ms" if "cpu_ms_per_op" in line else ""
        text += f" ({line['median_ms']:.0f} ms{cpu})"
    if line.get("success", 1) < 1:
        text += f", {line['success']:.0%} found"
    return text


def tables(lines: Iterable[dict]) -> str:
    """One markdown table per preset, in the order the presets first appear."""
    figures: dict[str, dict[tuple[str, int, str], dict]] = {}
    errors: dict[str, list[str]] = {}
    for line in lines:
        preset = line.get("preset")
        if line.get("bench") != "wan" or preset is None:
            continue
        if "error" in line:
            errors.setdefault(preset, []).append(f"{line.get('system')}: {line['error'][:160]}")
        elif "metric" in line:
            figures.setdefault(preset, {})[(line["metric"], line.get("nodes", 0), line["system"])] = line
    out = []
    for preset, got in figures.items():
        out += [
            f"#### {preset}",
            "",
            "| figure | " + " | ".join(SYSTEMS) + " |",
            "|---" * (len(SYSTEMS) + 1) + "|",
        ]
        rows = [(m, 0, label) for m, label in RPC_ROWS]
        for nodes in sorted({n for (_, n, _) in got if n}):
            rows += [(m, nodes, f"{label}, {nodes} nodes") for m, label in DHT_ROWS]
        for metric, nodes, label in rows:
            cells = [cell(got.get((metric, nodes, s))) for s in SYSTEMS]
            if any(c != "-" for c in cells):
                out.append(f"| {label} | " + " | ".join(cells) + " |")
        out += [f"\nerror: {e}" for e in errors.get(preset, [])]
        out.append("")
    return "\n".join(out)


def main() -> None:
    lines = []
    for path in sys.argv[1:]:
        with open(path) as fh:
            lines += [json.loads(raw) for raw in fh if raw.startswith("{")]
    print(tables(lines))


if __name__ == "__main__":
    main()
