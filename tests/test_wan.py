"""The WAN testbed (lattice.testing.wan): shaped links between real namespaces, measured.

Skipped unless namespaces, tc and iptables are usable here (root).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from lattice.testing import _delayline
from lattice.testing.wan import PRESETS, Link, WanTestbed, links_for, wan_unavailable

_reason = wan_unavailable()
needs_root = pytest.mark.skipif(_reason is not None, reason=_reason or "")

PY = sys.executable

# Sends argv[2] numbered UDP datagrams to argv[1]:9999 at ~2,000/s; the receiver counts them.
UDP_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    s.sendto(i.to_bytes(4, "big"), (sys.argv[1], 9999)); time.sleep(0.0005)
"""
UDP_COUNT = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 9999)); s.settimeout(1.0)
print("up", flush=True); n = 0
try:
    while True:
        s.recv(16); n += 1
except TimeoutError:
    print(n)
"""


def test_presets_compose_to_the_promised_path() -> None:
    links = links_for(["a", "b"], "continental")
    a, b = links["a"], links["b"]
    assert 2 * (a.delay_ms + b.delay_ms) == PRESETS["continental"].rtt_ms == 40  # RTT, not one way
    assert 1 - (1 - a.loss) * (1 - b.loss) == pytest.approx(0.001)
    assert links_for(["x"], "mixed")["x"].label == "cloud"
    with pytest.raises(ValueError):
        Link(delay_ms=1, jitter_ms=2)


def test_delayline_messages_round_trip() -> None:
    msg = _delayline.verdict(3, 77, accept=True)
    length, kind, flags, _, _ = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags) == (len(msg), _delayline.NFQNL_MSG_VERDICT, 1)
    assert msg[-8:] == struct.pack(">II", 1, 77)
    # A queued-packet message as the kernel sends it: header attr (id 5), payload attr (IPv4 header).
    ip = bytes(12) + bytes([10, 0, 0, 1, 10, 0, 0, 2])
    attrs = struct.pack("=HH", 11, 1) + struct.pack(">IHB", 5, 0x800, 0) + b"\0"
    attrs += struct.pack("=HH", 4 + len(ip), 10) + ip
    body = bytes(4) + attrs
    raw = struct.pack("=IHHII", 16 + len(body), _delayline.NFQNL_MSG_PACKET, 0, 0, 0) + body
    assert _delayline.parse_packets(raw + raw) == [(5, ip), (5, ip)]
    assert _delayline.parse_packets(raw[:10]) == []


@needs_root
def test_continental_path_gives_its_rtt_and_rate() -> None:
    with WanTestbed(["a", "b"], "continental") as tb:
        r = tb.probe("a", "b", megabytes=8, pings=10)
        pid = tb.delayline_pid()
        assert pid is not None and os.path.exists(f"/proc/{pid}")
    assert 39 <= r["echo_ms"] <= 50, r  # 40 ms RTT; a loaded machine adds a little
    assert 36 <= r["connect_ms"] <= 80, r
    # 200 Mbit/s: a plain TCP transfer of 8 MB (slow start included) gets a good part of it, never more.
    assert 0.4 * 200 <= r["goodput_mbit"] <= 200, r
    assert not os.path.exists(f"/proc/{pid}")  # the delay line is gone with the testbed


@needs_root
def test_home_uplink_is_the_bottleneck_and_loss_is_applied() -> None:
    home = Link(delay_ms=5, up_mbit=20, down_mbit=100, loss=0.05, label="home")
    with WanTestbed(["home", "cloud"], "mixed", links={"home": home, "cloud": Link(delay_ms=5)}) as tb:
        up = tb.probe("home", "cloud", megabytes=4, pings=5)
        counter = tb.popen("cloud", [PY, "-c", UDP_COUNT], stdout=subprocess.PIPE, text=True)
        assert counter.stdout is not None and counter.stdout.readline().strip() == "up"
        sent = 2000
        r = tb.run("home", [PY, "-c", UDP_SEND, tb.ip("cloud"), str(sent)], timeout=30)
        assert r.returncode == 0, r.stderr
        received = int(counter.stdout.readline())
    assert 10 <= up["goodput_mbit"] <= 20, up  # the 20 Mbit/s uplink, not the 100 Mbit/s downlink
    assert 20 <= up["echo_ms"] <= 30, up  # 2 x (5 + 5) ms
    assert 0.90 * sent <= received <= 0.98 * sent  # 5 % lost (binomial: 95 % +- 1.5 %)
