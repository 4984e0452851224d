"""Run the interop suite and print docs/interop.md's table (markdown) from its results.

    PYTHONPATH=src python tools/interop_table.py            # needs p2pd, py-libp2p, root (Lattica)

Each cell names what the peer did with a lattice-node and the test that showed it: pass, FAIL, or
skipped (with pytest's reason). The tests are the source of truth; this only tabulates them.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET  # our own pytest's report, not network data
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {
    "go (p2pd)": ["tests/test_interop_go.py", "tests/test_pubsub_interop_go.py"],
    "py-libp2p 0.8.1": ["tests/test_interop_pylibp2p.py"],
    "Lattica 1.0.21": ["tests/test_interop_lattica.py"],
}
# capability -> {peer column -> tests that show it}
ROWS: dict[str, dict[str, list[str]]] = {
    "they dial us": {
        "go (p2pd)": ["test_go_dials_us_identifies_and_pings"],
        "py-libp2p 0.8.1": ["test_pylibp2p_dials_us_identifies_and_pings"],
        "Lattica 1.0.21": ["test_connect_both_ways_identify_and_ping"],
    },
    "we dial them": {
        "go (p2pd)": ["test_we_dial_go_identify_ping_and_use_its_dht"],
        "py-libp2p 0.8.1": ["test_we_dial_pylibp2p_identify_and_ping"],
        "Lattica 1.0.21": ["test_connect_both_ways_identify_and_ping"],
    },
    "identify + ping (both ways)": {
        "go (p2pd)": [
            "test_go_dials_us_identifies_and_pings",
            "test_we_dial_go_identify_ping_and_use_its_dht",
        ],
        "py-libp2p 0.8.1": [
            "test_pylibp2p_dials_us_identifies_and_pings",
            "test_we_dial_pylibp2p_identify_and_ping",
        ],
        "Lattica 1.0.21": ["test_connect_both_ways_identify_and_ping"],
    },
    "FIND_NODE to us, finding a third peer": {
        "go (p2pd)": ["test_go_queries_our_dht", "test_go_adds_a_lone_lattice_node_to_its_routing_table"],
        "py-libp2p 0.8.1": ["test_pylibp2p_finds_a_third_peer_through_us"],
        "Lattica 1.0.21": ["test_lattica_bootstraps_through_us_and_finds_a_third_lattica_node"],
    },
    "FIND_NODE to them, finding a third peer": {
        "go (p2pd)": ["test_we_find_a_third_peer_through_go"],
        "py-libp2p 0.8.1": ["test_we_find_a_third_peer_through_pylibp2p"],
        "Lattica 1.0.21": ["test_we_find_a_third_node_through_lattica"],
    },
    "providers (both ways)": {
        "go (p2pd)": ["test_go_queries_our_dht", "test_we_dial_go_identify_ping_and_use_its_dht"],
        "py-libp2p 0.8.1": ["test_providers_both_ways_with_pylibp2p"],
        "Lattica 1.0.21": ["test_providers_both_ways"],
    },
    "their values: refused (reset), both keep serving": {
        "go (p2pd)": ["test_go_put_value_of_a_libp2p_record_is_refused_and_go_survives"],
        "py-libp2p 0.8.1": ["test_pylibp2p_values_are_refused_and_both_keep_serving"],
        "Lattica 1.0.21": ["test_lattica_values_are_refused_never_unpickled"],
    },
    "DHT clients kept out of our routing table": {
        "go (p2pd)": ["test_go_in_client_mode_is_served_but_not_in_our_routing_table"],
    },
    "gossipsub": {"go (p2pd)": ["test_lattice_and_go_libp2p_exchange_gossipsub_messages"]},
    "circuit relay v2 (their relay, our peers)": {
        "py-libp2p 0.8.1": ["test_relay_v2_through_a_pylibp2p_relay"]
    },
}


def run(junit: Path) -> dict[str, tuple[str, str]]:
    """Run every module; test name -> (outcome, skip reason)."""
    files = [f for group in MODULES.values() for f in group]
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={junit}", *files]
    subprocess.run(cmd, cwd=ROOT, check=False)
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name", "")
        if case.find("failure") is not None or case.find("error") is not None:
            out[name] = ("FAIL", "")
        elif (skip := case.find("skipped")) is not None:
            out[name] = ("skipped", (skip.get("message") or "")[:80])
        else:
            out[name] = ("pass", "")
    return out


def cell(results: dict[str, tuple[str, str]], tests: list[str]) -> str:
    if not tests:
        return "-"
    got = [results.get(t, ("not run", "")) for t in tests]
    names = ", ".join(f"`{t}`" for t in tests)
    if all(o == "pass" for o, _ in got):
        return f"pass ({names})"
    bad = next((o, why) for o, why in got if o != "pass")
    return f"{bad[0]}{': ' + bad[1] if bad[1] else ''} ({names})"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        results = run(Path(tmp) / "junit.xml")
    peers = list(MODULES)
    print("| | " + " | ".join(peers) + " |")
    print("|---" * (len(peers) + 1) + "|")
    for row, by_peer in ROWS.items():
        print(f"| {row} | " + " | ".join(cell(results, by_peer.get(p, [])) for p in peers) + " |")
    failed = sum(o == "FAIL" for o, _ in results.values())
    print(f"\n{len(results)} tests: {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
