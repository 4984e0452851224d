"""The web page the daemon serves at ``/``: static files in ``lattice/observe/static/`` (HTML, one
script, one stylesheet; no CDN, nothing fetched but ``/api/state``), polling every 2 s. It draws the
swarm as this node's graph (connected peers solid, DHT-only peers dashed; green direct, orange
relayed), a peer table with traffic and RTT, traffic per protocol, limits and bans, and the panels
apps push to ``node.dashboard``.

All text from the network goes in through ``textContent`` (never innerHTML): a peer's agent string
cannot inject markup. The files are package data, read with importlib.resources; only the names
below are served (no path from a request ever reaches the file system).
"""

from __future__ import annotations

import functools
from importlib.resources import files

__all__ = ["ASSETS", "asset"]

ASSETS = {  # URL path -> (file in static/, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/page.css": ("page.css", "text/css; charset=utf-8"),
}


@functools.cache
def _read(name: str) -> bytes:
    return files("lattice.observe").joinpath("static", name).read_bytes()


def asset(path: str) -> tuple[bytes, str] | None:
    """(body, content type) of the page file served at URL ``path``, or None if there is none."""
    entry = ASSETS.get(path)
    if entry is None:
        return None
    name, content_type = entry
    return _read(name), content_type
