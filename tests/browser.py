"""Headless Chromium (Debian ``chromium``) for page tests: the rendered DOM and screenshots."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["chromium", "dump_dom", "screenshot"]

_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars",
]  # fmt: skip


def chromium() -> str | None:
    """Path of the Chromium binary, or None if it is not installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="lattice-chromium-") as profile:
        return subprocess.run(
            [binary, *_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip


def dump_dom(url: str, budget_ms: int = 5000, timeout: float = 60.0) -> str:
    """The DOM after the page's scripts ran for ``budget_ms`` of virtual time."""
    result = _run([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout)
    if result.returncode != 0:
        raise RuntimeError(f"chromium failed ({result.returncode}): {result.stderr[-1000:]}")
    return result.stdout


def screenshot(url: str, path: Path, size: tuple[int, int] = (1280, 900), budget_ms: int = 5000,
               timeout: float = 60.0) -> Path:  # fmt: skip
    """A PNG of the page after ``budget_ms`` of virtual time."""
    result = _run(
        [
            f"--virtual-time-budget={budget_ms}",
            f"--window-size={size[0]},{size[1]}",
            f"--screenshot={path}",
            url,
        ],
        timeout,
    )
    if result.returncode != 0 or not Path(path).is_file():
        raise RuntimeError(f"chromium screenshot failed ({result.returncode}): {result.stderr[-1000:]}")
    return Path(path)
