"""Content between real daemons: a fetch from four providers completes, bitwise right, when two of
them are SIGKILLed midway (issue 20)."""

from __future__ import annotations

import os
import signal
import threading

from lattice.testing.daemons import start_daemon

LOOPBACK = ["--listen", "/ip4/127.0.0.1/tcp/0"]
MIB = 1 << 20


def test_a_fetch_from_four_providers_survives_two_of_them_killed_midway(tmp_path):
    config = tmp_path / "provider.toml"
    config.write_text("[node.content]\nserve_peer_rate = 2097152\n")  # 2 MiB/s each: the fetch takes seconds
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(12 * MIB))
    started = []
    try:
        providers = []
        for i in range(4):
            providers.append(start_daemon(tmp_path, f"p{i}", [*LOOPBACK, "--config", str(config)]))
            started.append(providers[-1])
        fetcher = start_daemon(tmp_path, "fetcher", LOOPBACK)
        started.append(fetcher)
        cids = {p.call("content.add", path=str(blob), chunk_size=256 << 10)["cid"] for p in providers}
        assert len(cids) == 1
        cid = cids.pop()
        out = tmp_path / "out.bin"
        killed = threading.Event()
        items = []
        with fetcher.client() as client:
            addrs = [p.info["addrs"][0] for p in providers]
            for item in client.stream("content.get", cid=cid, output=str(out), providers=addrs):
                items.append(item)
                if not killed.is_set() and item.get("fetched", 0) >= 16:
                    for victim in providers[:2]:
                        victim.proc.send_signal(signal.SIGKILL)
                    killed.set()
        assert killed.is_set() and items[-1]["done"] is True, items[-1]
        assert out.read_bytes() == blob.read_bytes()
        progress = [i for i in items if "done" not in i]
        assert progress[-1]["fetched"] == 48, progress[-1]
        # the killed ones are dropped once they fail 3 requests in a row; with 4 MiB batches the
        # live two may finish first (nothing left to ask the dead ones): never a live one dropped
        assert set(progress[-1]["dropped"]) <= {p.peer_id for p in providers[:2]}, progress[-1]
        per = progress[-1]["per_provider"]
        assert all(per[p.peer_id]["chunks"] > 0 for p in providers), per  # all four served a part
        assert "Traceback" not in fetcher.log()
    finally:
        for daemon in started:
            daemon.stop()
