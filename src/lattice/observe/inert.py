"""Text from remote peers, made inert before it reaches the operator's terminal.

A peer chooses its agent string, its protocol names, the DHT values it stores, ban reasons that quote
it: printed as they are, escape sequences in them recolour or clear the screen, set the window title,
plant hyperlinks, and bidi overrides reorder what is shown; given to rich as markup, ``[link=...]``
and ``[red]`` would be interpreted too. :func:`inert` shows every non-printable character (C0 and C1
controls, ESC, DEL, bidi and other format characters, separators other than the space) as a visible
escape such as ``\\x1b`` or ``\\u202e``; :func:`inert_text` is that as a rich Text, which rich
never parses for markup or emoji. JSON output needs neither: json.dumps escapes control characters.
"""

from __future__ import annotations

from typing import Any

__all__ = ["inert", "inert_text"]


def _visible(ch: str) -> str:
    code = ord(ch)
    if ch in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def inert(value: Any, keep: str = "") -> str:
    """``str(value)`` with every non-printable character (but those in ``keep``, e.g. "\\n" for
    multi-line text) replaced by a visible escape."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch in keep else _visible(ch) for ch in text)


def inert_text(value: Any, style: str = "") -> Any:
    """:func:`inert` as a rich ``Text``: a table cell or printable that rich shows literally."""
    from rich.text import Text

    return Text(inert(value), style=style)
