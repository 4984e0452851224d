"""Metrics endpoint, JSON state, dashboard panels, JSON logs and `top`: real nodes and daemons."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import trio
from prometheus_client.parser import text_string_to_metric_families

from lattice.config import NodeConfig
from lattice.node import Node
from lattice.testing.daemons import start_daemon

SAMPLE = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\]|\\.)*",?)*\})? -?[0-9.e+]+$')


def _node(tmp_path, name: str) -> Node:
    cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / name, control=False,
                     reachability="public", metrics_listen="127.0.0.1:0")  # fmt: skip
    return Node(cfg)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_metrics_endpoint_and_state(tmp_path):
    async with _node(tmp_path, "a") as a, _node(tmp_path, "b") as b:
        with trio.fail_after(10):
            await b.connect(a.addrs[0])
            await a.host.wait_identified(b.peer_id)
            while len(a.dht.table) < 1 or len(b.dht.table) < 1:  # else b's put stays local
                await trio.sleep(0.01)
            await b.dht.put("k", b"v")
        panel = a.dashboard.panel("train", title="training loss", unit="loss")
        for step in range(3):
            panel.push("loss", step, 1.0 / (step + 1))
        assert a.http_url.startswith("http://127.0.0.1:")
        status, text = await trio.to_thread.run_sync(_get, a.http_url + "metrics")
        assert status == 200
        for line in text.splitlines():
            assert line.startswith("# ") or SAMPLE.match(line), line
        assert "lattice_peers_connected 1" in text
        assert "lattice_swarm_known_peers 2" in text
        assert 'lattice_nat_reachability{state="public"} 1' in text
        assert re.search(
            r'lattice_protocol_bytes_total\{direction="in",protocol="/lattice/kad/1.0.0"\} [1-9]', text
        )
        assert re.search(r'lattice_dht_requests_total\{direction="in"\} [1-9]', text)
        assert 'lattice_dht_op_seconds_count{op="request"}' in text or "lattice_dht_op_seconds" in text
        assert "lattice_rpc_calls_total" in text and "lattice_crdt_updates_applied_total" in text

        status, body = await trio.to_thread.run_sync(_get, a.http_url + "api/state")
        state = json.loads(body)
        assert state["swarm_size"] == 2 and state["swarm"] == "default"
        assert [p["peer_id"] for p in state["peers"]] == [str(b.peer_id)]
        assert state["peers"][0]["bytes_in"] > 0 and state["peers"][0]["in_dht"]
        assert state["panels"][0]["series"]["loss"][2] == [2.0, 1 / 3]
        assert (await trio.to_thread.run_sync(_get, a.http_url + "nope"))[0] == 404


async def test_http_server_bounds_requests(tmp_path):
    async with _node(tmp_path, "a") as a:
        host, port = a.http_url.removeprefix("http://").rstrip("/").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"GET /" + b"x" * 9000 + b" HTTP/1.1\r\n\r\n")
        with trio.fail_after(5):
            reply = await stream.receive_some(4096)
        assert reply.startswith(b"HTTP/1.1 431")
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"junk\r\n\r\n")
        with trio.fail_after(5):
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 400")
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"GET /api/state HTTP/1.1\r\nHost: evil.example:80\r\n\r\n")
        with trio.fail_after(5):
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 403")  # DNS rebinding
        # the server still answers afterwards (urllib sends Host: 127.0.0.1:PORT)
        assert (await trio.to_thread.run_sync(_get, a.http_url + "metrics"))[0] == 200


def test_json_logs_and_top(tmp_path):
    a = start_daemon(tmp_path, "a", ["--listen", "/ip4/127.0.0.1/tcp/0", "--reachability", "public"])
    b = start_daemon(
        tmp_path, "b",
        ["--listen", "/ip4/127.0.0.1/tcp/0", "--reachability", "public", "--log-format", "json",
         "--log-level", "info", "--bootstrap", a.info["addrs"][0], "--metrics-listen", "127.0.0.1:0"],
    )  # fmt: skip
    try:
        assert b.info["http"].startswith("http://127.0.0.1:")
        cli = [sys.executable, "-m", "lattice.cli"]
        out = subprocess.run([*cli, "top", "--count", "1", "--control", b.info["control"]],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "swarm default" in out.stdout and "traffic by protocol" in out.stdout
        snap = json.loads(subprocess.run([*cli, "top", "--json", "--control", b.info["control"]],
                                         capture_output=True, text=True, timeout=20).stdout)  # fmt: skip
        assert snap["peer_id"] == b.peer_id and snap["connected_peers"] == 1
    finally:
        b.stop()
        a.stop()
    lines = [json.loads(line) for line in b.log().splitlines() if line.startswith("{")]
    assert any(r["level"] == "info" and "bootstrap" in r["msg"] for r in lines), b.log()
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in lines)


def _raw(host: str, port: int, request: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


async def test_http_server_serves_the_page_files_and_negotiates_the_metrics_format(tmp_path):
    async with _node(tmp_path, "a") as a:
        host, port = a.http_url.removeprefix("http://").rstrip("/").split(":")

        def get(target: str, method: str = "GET", extra: str = "") -> tuple[bytes, dict[str, str], bytes]:
            reply = _raw(
                host, int(port), f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()
            )
            head, _, body = reply.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            return (
                lines[0].encode(),
                {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])},
                body,
            )

        status, headers, page = await trio.to_thread.run_sync(get, "/")
        assert status.startswith(b"HTTP/1.1 200") and b'<script src="page.js">' in page
        assert "default-src 'self'" in headers["content-security-policy"]  # no inline script runs
        for path, kind in (("/page.js", "text/javascript"), ("/page.css", "text/css")):
            status, headers, body = await trio.to_thread.run_sync(get, path)
            assert status.startswith(b"HTTP/1.1 200") and headers["content-type"].startswith(kind) and body
        status, headers, body = await trio.to_thread.run_sync(get, "/page.js", "HEAD")
        assert status.startswith(b"HTTP/1.1 200") and int(headers["content-length"]) > 0 and body == b""
        for path in ("/../pyproject.toml", "/static/index.html", "/page.py"):
            assert (await trio.to_thread.run_sync(get, path))[0].startswith(b"HTTP/1.1 404")
        assert (await trio.to_thread.run_sync(get, "/", "POST"))[0].startswith(b"HTTP/1.1 405")

        status, headers, text = await trio.to_thread.run_sync(get, "/metrics")
        names = {f.name for f in text_string_to_metric_families(text.decode())}  # the reference parser
        assert {"lattice_info", "lattice_peers_connected", "lattice_nat_reachability"} <= names
        assert headers["content-type"].startswith("text/plain")
        accept = "Accept: application/openmetrics-text; version=1.0.0\r\n"
        status, headers, text = await trio.to_thread.run_sync(get, "/metrics", "GET", accept)
        assert headers["content-type"].startswith("application/openmetrics-text") and text.endswith(
            b"# EOF\n"
        )


async def test_http_server_refuses_a_complete_oversized_head(tmp_path):
    """A whole head over the bound refused (431) even when it arrives complete in one piece."""
    async with _node(tmp_path, "a") as a:
        host, port = a.http_url.removeprefix("http://").rstrip("/").split(":")
        head = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Pad: " + b"y" * 9000 + b"\r\n\r\n"
        reply = await trio.to_thread.run_sync(_raw, host, int(port), head)
        assert reply.startswith(b"HTTP/1.1 431")
        for bad in (
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ):  # no / two Hosts
            assert (await trio.to_thread.run_sync(_raw, host, int(port), bad)).startswith(b"HTTP/1.1 400")
        assert (await trio.to_thread.run_sync(_get, a.http_url + "metrics"))[0] == 200
