"""A Lattica 1.0.21 node driven over stdin/stdout, for tests/test_interop_lattica.py.

Runs with the Lattica venv's python (not ours), inside a loopback-only network namespace (Lattica
queries public STUN servers at start). Stdlib + lattica only. One JSON command per stdin line, one
JSON reply per stdout line: ``{"op": "build", "port": P, "bootstrap": [...]}`` -> ``{"addr": ...}``,
then ``peers``, ``peer_info``, ``connect``, ``provide``, ``providers``, ``store``, ``get``,
``addresses``; errors come back as ``{"error": "..."}``. EOF on stdin ends the node.
Lattica prints to fd 1 itself: our replies go to a private copy of it, fd 1 goes to stderr.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time


def _probe(port: int, deadline_s: float = 20.0) -> None:
    """Wait until the listener on 127.0.0.1:port negotiates multistream-select (the node is live)."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"\x13/multistream/1.0.0\n")
                if s.recv(64):
                    return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.01)


def build(args: dict, data_dir: str):
    from lattica import Lattica

    addr = f"/ip4/127.0.0.1/tcp/{args['port']}"
    b = (
        Lattica.builder()
        .with_listen_addrs([addr])
        .with_external_addrs([addr])
        .with_mdns(False)
        .with_upnp(False)
        .with_autonat(False)
        .with_dcutr(False)
        .with_key_path(os.path.join(data_dir, "key"))
        .with_storage_path(os.path.join(data_dir, "storage"))
        .with_dht_db_path(os.path.join(data_dir, "dht"))
    )
    if args.get("bootstrap"):
        b = b.with_bootstraps(list(args["bootstrap"]))
    node = b.build()
    _probe(args["port"])
    return node, f"{addr}/p2p/{node.peer_id()}"


def handle(node, cmd: dict) -> dict:
    op = cmd["op"]
    if op == "peers":
        return {"peers": node.get_all_peers()}
    if op == "peer_info":
        info = node.get_peer_info(cmd["peer"])
        if info is None:
            return {"info": None}
        fields = ("protocol_version", "agent_version", "protocols", "addresses", "rtt_ms")
        return {"info": {f: getattr(info, f, None) for f in fields}}
    if op == "addresses":
        return {"addrs": node.get_peer_addresses(cmd["peer"])}
    if op == "connect":
        node._lattica_instance.connect(cmd["addr"])
        return {"ok": True}
    if op == "provide":
        node.start_providing(cmd["key"])
        return {"ok": True}
    if op == "providers":
        return {"providers": node.get_providers(cmd["key"])}
    if op == "store":  # Lattica pickles the value (client.py): what a Lattice node must refuse
        return {"ok": node.store(cmd["key"], cmd["value"], time.time() + 600)}
    if op == "get":
        found = node.get(cmd["key"])
        return {"value": None if found is None else repr(found.value)}
    return {"error": f"unknown op {op!r}"}


def main() -> int:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    data_dir = sys.argv[1]
    node = None
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "build":
                node, addr = build(cmd, data_dir)
                reply = {"addr": addr, "peer_id": node.peer_id()}
            else:
                reply = handle(node, cmd)
        except Exception as exc:  # reported to the test, which decides
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
    if node is not None:
        node.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
