"""Panels apps push series to (training curves, inference sessions); the web page draws them.

    panel = node.dashboard.panel("gossip-sgd", title="training loss", unit="loss")
    panel.push("loss", step, value)          # one point; old points fall off (bounded)
    panel.set_text("sessions", "3 active")   # a short status line

Bounded: at most MAX_PANELS panels, MAX_SERIES series each, MAX_POINTS points per series.
"""

from __future__ import annotations

from collections import deque

from lattice.errors import NodeError

__all__ = ["Dashboard", "Panel"]

MAX_PANELS = 32
MAX_SERIES = 16
MAX_POINTS = 512


class Panel:
    def __init__(self, name: str, title: str, unit: str) -> None:
        self.name = name
        self.title = title
        self.unit = unit
        self.series: dict[str, deque[tuple[float, float]]] = {}
        self.texts: dict[str, str] = {}

    def push(self, series: str, x: float, y: float) -> None:
        """Append point (x, y) to ``series`` (created on first use)."""
        points = self.series.get(series)
        if points is None:
            if len(self.series) >= MAX_SERIES:
                raise NodeError(f"panel {self.name!r} has {MAX_SERIES} series already")
            points = self.series[series] = deque(maxlen=MAX_POINTS)
        points.append((float(x), float(y)))

    def set_text(self, key: str, text: str) -> None:
        if key not in self.texts and len(self.texts) >= MAX_SERIES:
            raise NodeError(f"panel {self.name!r} has {MAX_SERIES} text lines already")
        self.texts[key] = str(text)[:200]

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "unit": self.unit,
            "series": {k: [list(p) for p in v] for k, v in self.series.items()},
            "texts": dict(self.texts),
        }


class Dashboard:
    """The node's panel registry (``node.dashboard``)."""

    def __init__(self) -> None:
        self.panels: dict[str, Panel] = {}

    def panel(self, name: str, title: str = "", unit: str = "") -> Panel:
        """The panel called ``name``, created on first use."""
        panel = self.panels.get(name)
        if panel is None:
            if len(self.panels) >= MAX_PANELS:
                raise NodeError(f"the dashboard has {MAX_PANELS} panels already")
            panel = self.panels[name] = Panel(name, title or name, unit)
        return panel

    def as_list(self) -> list[dict]:
        return [p.as_dict() for p in self.panels.values()]
