"""Terminal injection (issue 16, defect 16): what a hostile peer puts in its agent string or in a DHT
value reaches the operator's terminal inert (no escape sequence, no rich markup), shown literally."""

from __future__ import annotations

import json
import os
import sys

import trio

from attacks.hostile_text import HOSTILE_TEXT, connect_with_agent, serve_hostile_error, store_dht_value
from lattice.observe.inert import inert, inert_text
from lattice.testing.daemons import start_daemon, wait_for

CLI = [sys.executable, "-m", "lattice.cli"]
RAW = ("\x1b", "\x9b", "\u202e")  # ESC, C1 CSI, bidi override: none may reach the terminal
LITERAL = ("[red]x[/]", "[link=https://evil.example]click[/link]", ":skull:", "\\x1b[31mred", "\\u202e")


def test_inert_shows_controls_as_visible_escapes():
    assert inert("\x1b[31mred\x1b[0m") == "\\x1b[31mred\\x1b[0m"  # CSI
    assert inert("\x1b]0;title\x07") == "\\x1b]0;title\\x07"  # OSC: window title, BEL
    assert inert("\x9b2J \x85 \x7f \x00") == "\\x9b2J \\x85 \\x7f \\x00"  # C1 CSI, NEL, DEL, NUL
    assert inert("abc\u202edcba\u2066x\u200f") == "abc\\u202edcba\\u2066x\\u200f"  # bidi overrides
    assert inert("two\nlines\tand\r") == "two\\nlines\\tand\\r"  # no forged output lines
    assert inert("two\nlines", keep="\n") == "two\nlines"
    assert inert("\u2028\U000e0001") == "\\u2028\\U000e0001"
    plain = "lattice/0.1 héllo 日本 💀 [red]x[/] C:\\path"
    assert inert(plain) == plain and inert(inert(HOSTILE_TEXT)) == inert(HOSTILE_TEXT)
    assert inert(b"x") == "b'x'" and inert(42) == "42"


def test_inert_text_is_never_read_as_rich_markup():
    from io import StringIO

    from rich.console import Console

    out = StringIO()
    console = Console(file=out, force_terminal=True, color_system="truecolor", width=300)
    console.print(inert_text("[red]x[/] [link=https://evil.example]click[/link] [bold]b :skull:"))
    text = out.getvalue()
    assert "[red]x[/] [link=https://evil.example]click[/link] [bold]b :skull:" in text
    assert "\x1b]8;" not in text and "💀" not in text  # no hyperlink, no emoji
    assert "\x1b[31m" not in text and "\x1b[1m" not in text  # no colour, no bold


def test_daemon_log_lines_are_inert(capsys):
    import logging

    from lattice.observe.logs import InertFormatter

    record = logging.LogRecord("lattice.x", logging.INFO, __file__, 1, "agent %s", (HOSTILE_TEXT,), None)
    line = InertFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert "\x1b" not in line and "\u202e" not in line and "\\x1b[31mred" in line


def test_web_page_sets_remote_text_as_text_only():
    """The page (lattice/observe/static/page.js) builds every element with createElement/textContent
    and setAttribute: no HTML parsing of what peers chose. Keep it that way."""
    from lattice.observe.page import asset

    script = asset("/page.js")[0].decode()
    assert "<script>" not in asset("/")[0].decode()  # no inline script: the page's CSP forbids it
    for sink in (".innerHTML", ".outerHTML", ".insertAdjacentHTML", "document.write", "eval(", "Function("):
        assert sink not in script, sink
    assert "textContent" in script


async def _cli(*args: str) -> trio.CompletedProcess:
    env = {**os.environ, "COLUMNS": "2000"}  # one row per peer: the literal text is not folded
    return await trio.run_process(
        [*CLI, *args], capture_stdout=True, capture_stderr=True, env=env, check=False
    )


def _assert_inert(output: bytes) -> None:
    text = output.decode()
    for raw in RAW:
        assert raw not in text, f"{raw!r} reached the terminal: {text!r}"
    for literal in LITERAL:
        assert literal in text, f"{literal!r} not shown literally: {text!r}"


async def test_peers_shows_a_hostile_agent_string_inert(tmp_path):
    victim = start_daemon(tmp_path, "victim", ["--listen", "/ip4/127.0.0.1/tcp/0"])
    control = victim.info["control"]
    try:

        async def operator_lists_peers() -> tuple:
            def agent_known() -> bool:
                return any(row["agent"] == HOSTILE_TEXT for row in victim.call("peers"))

            await trio.to_thread.run_sync(wait_for, agent_known, 10.0, "the hostile agent in the peer store")
            return await _cli("peers", "--control", control), await _cli(
                "peers", "--json", "--control", control
            )

        result = await connect_with_agent(victim.info["addrs"][0], HOSTILE_TEXT, operator_lists_peers)
        table, as_json = result["during"]
        assert table.returncode == 0, table.stderr
        _assert_inert(table.stdout)
        rows = json.loads(as_json.stdout)  # --json stays JSON, with the exact text
        assert [r["agent"] for r in rows if r["peer_id"] == result["peer_id"]] == [HOSTILE_TEXT]
        assert victim.call("status")["peer_id"] == victim.peer_id  # the daemon still serves its operator
    finally:
        victim.stop()


async def test_dht_get_shows_a_hostile_value_inert(tmp_path):
    victim = start_daemon(tmp_path, "victim", ["--listen", "/ip4/127.0.0.1/tcp/0"])
    control = victim.info["control"]
    try:

        async def operator_reads_key() -> trio.CompletedProcess:
            return await _cli("dht", "get", "notes", "--control", control)

        result = await store_dht_value(
            victim.info["addrs"][0], "notes", HOSTILE_TEXT.encode(), tmp_path / "attacker", operator_reads_key
        )
        out = result["during"]
        assert result["stored_on"] >= 1 and out.returncode == 0, out.stderr
        _assert_inert(out.stdout)
    finally:
        victim.stop()


async def test_a_hostile_error_reply_is_one_inert_line(tmp_path):
    victim = start_daemon(tmp_path, "victim", ["--listen", "/ip4/127.0.0.1/tcp/0"])
    try:

        async def operator_calls(addr: str) -> trio.CompletedProcess:
            return await _cli("rpc", "call", addr, "evil", "--control", victim.info["control"])

        out = (await serve_hostile_error(tmp_path / "attacker", operator_calls))["during"]
        assert out.returncode == 2 and out.stdout == b""
        lines = out.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lattice-node: error: "), lines  # no forged line
        _assert_inert(out.stderr)
    finally:
        victim.stop()
