"""PNG plots of accuracy against rounds and against bytes sent (matplotlib, optional extra "apps")."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence


def read_runs(paths: Sequence[str]) -> dict[str, list[dict]]:
    """Label -> evaluation records of each log: a simulator log (``sim --log``: one record per
    evaluation) or a peer's ``log.jsonl`` ("round" records; its "average" record, if any, becomes
    the last point's ``acc_avg``). A label is the file name, or its directory for a ``log.jsonl``."""
    import json
    from pathlib import Path

    runs: dict[str, list[dict]] = {}
    for path in paths:
        p = Path(path)
        label = p.parent.name if p.name == "log.jsonl" else p.stem
        recs, average = [], None
        for line in p.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line being written
            if not isinstance(rec, dict):
                continue
            if rec.get("event") == "average":
                average = rec
            elif rec.get("event", "round") == "round" and "round" in rec:
                rec.setdefault("bytes_per_peer", rec.get("bytes_sent", 0))
                recs.append(rec)
        if average is not None and recs and average.get("acc_avg") is not None:
            recs[-1] = {**recs[-1], "acc_avg": average["acc_avg"]}
        while label in runs:
            label += "'"
        runs[label] = recs
    return runs


def plot(runs: Mapping[str, Sequence[dict]], out_dir: str, title: str = "") -> list[str]:
    """PNGs in ``out_dir``: accuracy vs rounds and vs bytes sent per peer, and vs wall-clock time when
    every record has ``t_s`` (peers' logs: seconds on the run's clock); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    axes = [
        ("round", "round", "accuracy_vs_rounds.png"),
        ("bytes_per_peer", "MB sent per peer", "accuracy_vs_bytes.png"),
    ]
    if all("t_s" in r for recs in runs.values() for r in recs):
        axes.append(("t_s", "wall-clock time (min)", "accuracy_vs_time.png"))
    scale = {"bytes_per_peer": 1e6, "t_s": 60.0}
    for x_key, x_label, name in axes:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, recs in runs.items():
            key = "acc_avg" if recs and all(r.get("acc_avg") is not None for r in recs) else "acc_local"
            points = [r for r in recs if r.get(key) is not None]
            xs = [r.get(x_key, 0) / scale.get(x_key, 1) for r in points]
            ax.plot(xs, [float(r[key]) for r in points], marker=".", label=f"{label} ({key})")
        if x_key == "bytes_per_peer":
            ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("test accuracy")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def markdown_table(finals: Mapping[str, dict]) -> str:
    """One row per run: average-model and local-model accuracy, consensus distance, bytes."""
    lines = [
        "| algorithm | acc(avg model) | acc(local, mean) | consensus | MB sent per peer | gradients/peer |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in finals.items():
        avg = "n/a" if r.get("acc_avg") is None else f"{r['acc_avg']:.3f}"
        lines.append(
            f"| {label} | {avg} | {r['acc_local']:.3f} | {r['consensus']:.1e} | "
            f"{r['bytes_per_peer'] / 1e6:.1f} | {r['gradients']} |"
        )
    return "\n".join(lines)
