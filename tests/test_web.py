"""The daemon's web page in headless Chromium (Debian `chromium`): right peer count, graph, panels."""

from __future__ import annotations

import json
import re
import struct
import time
import urllib.request

import pytest

import browser
from lattice.config import NodeConfig
from lattice.node import Node
from lattice.swarm.testnet import Testnet

pytestmark = pytest.mark.skipif(
    browser.chromium() is None,
    reason="chromium is not installed (.ci/run installs it: apt-get install chromium)",
)


def _peer_count(dom: str) -> int:
    match = re.search(r'id="peer-count">(\d+)<', dom)
    assert match, dom[:2000]
    return int(match.group(1))


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _check_page(net: Testnet, node_index: int, tmp_path, expected: int) -> None:
    url = net.nodes[node_index].info["http"]
    dom = browser.dump_dom(url)
    assert 'data-loaded="1"' in dom
    assert _peer_count(dom) == expected
    assert "budget: memory" in dom and "budget: slots" in dom  # the resource manager's use
    assert dom.count('class="peer-node"') == expected - 1
    with urllib.request.urlopen(url + "metrics", timeout=5) as reply:
        assert f"lattice_swarm_known_peers {expected}" in reply.read().decode()
    deadline = time.monotonic() + 5  # a connection's RTT is first measured 1 s after it opens
    while True:
        with urllib.request.urlopen(url + "api/state", timeout=5) as reply:
            connected = [p for p in json.loads(reply.read())["peers"] if p["connected"]]
        if (connected and all(p["rtt_ms"] is not None for p in connected)) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert connected and all(p["rtt_ms"] is not None for p in connected)  # measured soon after connect
    shot = browser.screenshot(url, tmp_path / f"node{node_index}.png", size=(1280, 900))
    assert _png_size(shot) == (1280, 900) and shot.stat().st_size > 20_000


def test_page_shows_the_testnet(tmp_path):
    with Testnet(tmp_path / "net", 4) as net:
        net.wait_dht(timeout=20)
        _check_page(net, 2, tmp_path, 4)


def test_page_draws_app_panels(tmp_path):
    cfg = NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], data_dir=tmp_path / "a", control=False,
                     reachability="public", metrics_listen="127.0.0.1:0")  # fmt: skip
    with Node.start(cfg) as node:
        panel = node.node.dashboard.panel("gossip-sgd", title="training loss", unit="loss")
        for step in range(20):
            panel.push("loss", step, 2.0 / (step + 1))
            panel.push("accuracy", step, step / 20)
        panel.set_text("peers", "<b>3</b> averaging")  # markup from an app stays text
        dom = browser.dump_dom(node.node.http_url)
    assert _peer_count(dom) == 1
    assert 'data-panel="gossip-sgd"' in dom and dom.count("<polyline") == 2
    assert "peers: &lt;b&gt;3&lt;/b&gt; averaging" in dom


@pytest.mark.slow
def test_sixteen_node_testnet_metrics_and_page_show_all(tmp_path):
    with Testnet(tmp_path / "net", 16) as net:
        net.wait_dht(timeout=30)
        for node in net.nodes:
            with urllib.request.urlopen(node.info["http"] + "metrics", timeout=5) as reply:
                assert "lattice_swarm_known_peers 16" in reply.read().decode()
        _check_page(net, 0, tmp_path, 16)
        _check_page(net, 9, tmp_path, 16)
