"""The NAT testbed (lattice.testing.netns): real namespaces, nftables NAT and sockets.

Skipped unless we can create network namespaces here (root, iproute2, nftables).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from lattice.testing.netns import NEIGHBOUR_TABLE, PREFIX, Site, Testbed, cleanup_stale, netns_unavailable

_reason = netns_unavailable()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

PY = sys.executable

# Accepts argv[1] connections on each port in argv[2:]; for each, sends b"hi" and prints
# "<port> <peer ip> <peer port> <what the client sent back>".
SERVER = """
import select, socket, sys
socks = [socket.create_server(("0.0.0.0", int(p))) for p in sys.argv[2:]]
for _ in range(int(sys.argv[1]) * len(socks)):
    ready, _, _ = select.select(socks, [], [], 10)
    assert ready, "no client"
    c, (ip, port) = ready[0].accept()
    c.settimeout(5)
    c.sendall(b"hi")
    print(ready[0].getsockname()[1], ip, port, c.recv(16).decode(), flush=True)
    c.close()
"""

# Connects from local port argv[1] (0: any) to argv[2] on each port in argv[3:], retrying while the
# server is not up yet; prints the local address of each connection.
CLIENT = """
import socket, sys, time
local, host = int(sys.argv[1]), sys.argv[2]
keep = []
for port in sys.argv[3:]:
    deadline = time.monotonic() + 3
    while True:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("0.0.0.0", local))
        s.settimeout(2)
        try:
            s.connect((host, int(port)))
            break
        except ConnectionRefusedError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert s.recv(2) == b"hi"
    s.sendall(b"yo")
    print(*s.getsockname(), flush=True)
    keep.append(s)
"""

# TCP simultaneous open: bind argv[1], connect to (argv[2], argv[3]) until argv[4] seconds have passed;
# on success send argv[5] and print what the other side sent. Exit 1 on failure.
PUNCH = """
import socket, sys, time
local, host, port, window, me = sys.argv[1:]
local, port, window = int(local), int(port), float(window)
deadline = time.monotonic() + window
errors = {}
while (left := deadline - time.monotonic()) > 0:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0", local))
    s.settimeout(left)
    try:
        s.connect((host, port))
    except OSError as exc:
        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        s.close()
        time.sleep(0.05)
        continue
    s.settimeout(3)
    s.sendall(me.encode())
    print("got", s.recv(16).decode(), flush=True)
    s.close()
    sys.exit(0)
print("failed", errors, flush=True)
sys.exit(1)
"""


@pytest.fixture(scope="module")
def tb():
    with Testbed(
        public=["relay"],
        sites=[Site("a", "cone"), Site("b", "cone"), Site("c", "symmetric")],
    ) as bed:
        yield bed


def _serve(tb: Testbed, count: int, *ports: int) -> subprocess.Popen[str]:
    return tb.popen(
        "relay",
        [PY, "-c", SERVER, str(count), *map(str, ports)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _connect(tb: Testbed, host: str, local: int, *ports: int) -> list[tuple[str, int]]:
    r = tb.run(host, [PY, "-c", CLIENT, str(local), tb.ip("relay"), *map(str, ports)], timeout=15)
    assert r.returncode == 0, r.stderr
    return [(ip, int(port)) for ip, port in (line.split() for line in r.stdout.splitlines())]


def _seen(server: subprocess.Popen[str]) -> list[tuple[int, str, int, str]]:
    out, err = server.communicate(timeout=10)
    assert server.returncode == 0, err
    return [(int(p), ip, int(sp), msg) for p, ip, sp, msg in (line.split() for line in out.splitlines())]


def _punch(tb: Testbed, x: str, y: str, port: int, window: float) -> tuple[subprocess.Popen[str], ...]:
    """Start a simultaneous open between peers x and y (both on local `port`); return both procs."""
    procs = []
    for me, other in ((x, y), (y, x)):
        argv = [PY, "-c", PUNCH, str(port), tb.public_ip(other), str(port), str(window), me]
        procs.append(tb.popen(me, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return tuple(procs)


def test_masquerade_outbound(tb: Testbed) -> None:
    server = _serve(tb, 1, 7001)
    ((local_ip, local_port),) = _connect(tb, "a1", 0, 7001)
    ((_, ip, port, msg),) = _seen(server)
    assert local_ip == tb.ip("a1") == "192.168.1.2"
    assert ip == tb.public_ip("a") == tb.public_ip("a1") != tb.ip("a1")
    assert port == local_port  # cone: the source port is kept
    assert msg == "yo"


def test_testbed_makes_room_in_the_shared_neighbour_table(tb: Testbed) -> None:
    """The ARP/NDP table is shared by all namespaces: with the kernel's default of 1,024 entries a
    64-host testbed made every other testbed on the machine fail (EHOSTUNREACH, SSDP unanswered)."""
    for family in ("ipv4", "ipv6"):
        for name, want in NEIGHBOUR_TABLE.items():
            with open(f"/proc/sys/net/{family}/neigh/default/{name}") as f:
                assert int(f.read()) >= want, (family, name)


def test_unsolicited_inbound_dropped(tb: Testbed) -> None:
    # A listener behind the NAT and one on the router itself: neither is reachable from outside.
    code = "import socket, time; s = socket.create_server(('0.0.0.0', 7002)); time.sleep(30)"
    tb.popen("a1", [PY, "-c", code])
    tb.popen("a", [PY, "-c", code])
    probe = f"""
import socket, sys
for port in (7002, 7003):
    try:
        socket.create_connection(("{tb.public_ip("a")}", port), timeout=0.7)
    except TimeoutError:
        print(port, "timeout")
    except OSError as exc:
        print(port, type(exc).__name__)
    else:
        print(port, "connected")
"""
    t0 = time.monotonic()
    r = tb.run("relay", [PY, "-c", probe], timeout=10)
    assert r.returncode == 0, r.stderr
    # Dropped (like a home router), not refused: the router never answers with a RST.
    assert r.stdout.split() == ["7002", "timeout", "7003", "timeout"]
    assert time.monotonic() - t0 < 3
    # The private network is not routed on the internet at all.
    r = tb.run("relay", [PY, "-c", f"import socket; socket.create_connection(('{tb.ip('a1')}', 7002), 0.5)"])
    assert r.returncode != 0


def test_simultaneous_open_through_two_cone_nats(tb: Testbed) -> None:
    pa, pb = _punch(tb, "a1", "b1", 40001, window=3.0)
    out_a, err_a = pa.communicate(timeout=10)
    out_b, err_b = pb.communicate(timeout=10)
    assert (pa.returncode, pb.returncode) == (0, 0), (out_a, err_a, out_b, err_b)
    assert out_a.split() == ["got", "b1"]
    assert out_b.split() == ["got", "a1"]


def test_symmetric_nat_changes_ports_and_defeats_simultaneous_open(tb: Testbed) -> None:
    # Mapping: one local port to two destinations. Cone keeps it; symmetric picks a new one each time.
    server = _serve(tb, 2, 7004, 7005)
    cone = _connect(tb, "a1", 41000, 7004, 7005)
    sym = _connect(tb, "c1", 41000, 7004, 7005)
    seen = _seen(server)
    assert [port for _, port in cone + sym] == [41000] * 4
    by_source = {(ip, dport): sport for dport, ip, sport, _ in seen}
    a_pub, c_pub = tb.public_ip("a"), tb.public_ip("c")
    assert by_source[(a_pub, 7004)] == by_source[(a_pub, 7005)] == 41000
    assert by_source[(c_pub, 7004)] != by_source[(c_pub, 7005)]

    t0 = time.monotonic()
    pa, pc = _punch(tb, "a1", "c1", 40002, window=1.5)
    out_a, _ = pa.communicate(timeout=10)
    out_c, _ = pc.communicate(timeout=10)
    assert (pa.returncode, pc.returncode) == (1, 1), (out_a, out_c)
    assert time.monotonic() - t0 < 4


def test_close_removes_namespaces_and_processes() -> None:
    t0 = time.monotonic()
    bed = Testbed(public=["relay", "public2"], sites=[Site("x"), Site("y", "symmetric", peers=("y1", "y2"))])
    created = time.monotonic() - t0
    assert created < 2, created
    names = [*bed.ns.values(), bed.internet]
    assert set(names) <= set(os.listdir("/run/netns"))
    assert bed.ip("public2") == "10.77.0.11" and bed.public_ip("y2") == "10.77.0.102"
    assert bed.ns.y2 == bed["y2"] == names[-2]
    # One tracked process that ignores SIGTERM, with a child in its process group.
    code = "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    code += "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    proc = bed.popen("y1", [PY, "-c", code])
    time.sleep(0.3)
    bed.close(grace=0.3)
    bed.close()  # idempotent
    assert proc.poll() is not None
    assert not [ns for ns in os.listdir("/run/netns") if ns in names]
    with pytest.raises(RuntimeError):
        bed.popen("y1", ["true"])


def test_cleanup_stale_after_sigkill() -> None:
    # A process that builds a testbed and is then SIGKILLed leaves its namespaces behind.
    code = """
import time
from lattice.testing.netns import Testbed
tb = Testbed()
p = tb.popen("a1", ["sleep", "60"])
while open(f"/proc/{p.pid}/comm").read().strip() != "sleep":  # `ip netns exec` has set the netns
    time.sleep(0.005)
print(p.pid, flush=True)
time.sleep(60)
"""
    proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        orphan = int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    left = [ns for ns in os.listdir("/run/netns") if ns.startswith(f"{PREFIX}{proc.pid}-")]
    assert len(left) == 6  # internet, relay, a, a1, b, b1
    assert sorted(cleanup_stale()) == sorted(left)
    assert not [ns for ns in os.listdir("/run/netns") if ns.startswith(f"{PREFIX}{proc.pid}-")]
    deadline = time.monotonic() + 2  # the orphaned `sleep` was killed (and reaped by init)
    while _running(orphan) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _running(orphan)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
