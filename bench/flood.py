"""bench/flood: a peer on its own host floods one node with junk (1,000 requests/s); is it banned,
and does the honest peers' latency stay within 2x of normal?

    python bench/flood.py [--runs 5] [--rate 1000] [--seconds 4]      (needs root: namespaces)

Three honest daemons (target, observer, other) and one flooder host per run live in network
namespaces on one bridge (lattice.testing.netns), so the flooder's IP (10.77.0.x) is not exempt from
IP bans. Per run, the observer measures ping and a 16-byte echo RPC to the target and to the other
node for ``--seconds`` with no flooder (the baseline), during the flood and after it; the figures
are during/baseline and after/baseline ratios of the per-run medians. The flooder (normal priority)
opens one DHT stream of random bytes per request at ``--rate``; once banned it keeps dialing at
``--rate`` with a fresh identity per dial. Everything shares this machine's cores: the
``*_other`` ratios show how much of the effect is the machine rather than the flooded node.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the flooder lives with the attack tests
from _common import emit  # noqa: E402


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()

    from attacks.flood import flood_runs
    from lattice.testing.netns import netns_unavailable

    if (why := netns_unavailable()) is not None:
        sys.exit(f"bench/flood needs network namespaces: {why}")
    with tempfile.TemporaryDirectory() as tmp:
        runs = flood_runs(Path(tmp), runs=args.runs, rate=args.rate, seconds=args.seconds)["runs"]
    for i, run in enumerate(runs):
        print(json.dumps({"run": i, **run}), file=sys.stderr, flush=True)

    for what in ("ping_target", "rpc_target", "ping_other", "rpc_other"):
        emit("flood", "lattice", f"{what}_baseline_ms", [r["before"][what] for r in runs])
        for phase in ("during", "after"):
            ratios = [r[phase][what] / r["before"][what] for r in runs]
            target = 2.0 if phase == "during" else None
            emit("flood", "lattice", f"{what}_ratio_{phase}", ratios, target=target)
    fl = [r["flooder"] for r in runs]
    emit("flood", "lattice", "banned_after_s", [f["banned_after_s"] or -1 for f in fl], rate=args.rate)
    emit("flood", "lattice", "junk_accepted_before_ban", [f["sent"] for f in fl])
    emit("flood", "lattice", "flooder_rate_before_ban", [f["rate_before_ban"] or 0 for f in fl])
    emit("flood", "lattice", "flooder_attempts_per_s", [f["attempts_per_s"] for f in fl])
    emit("flood", "lattice", "flooder_dials_per_s_after_ban", [f["dials_per_s_after_ban"] or 0 for f in fl])
    emit("flood", "lattice", "dials_accepted_after_ban", [f["dials_accepted"] for f in fl])
    emit("flood", "lattice", "refused_dial_ms", [f["refused_dial_ms_median"] or 0 for f in fl])
    emit("flood", "lattice", "flooder_cpu_cores", [f["flooder_cpu"] for f in fl])
    emit("flood", "lattice", "refused_connections", [r["target"]["refused_connections"] for r in runs])
    emit("flood", "lattice", "refused_at_accept", [r["target"]["refused_at_accept"] for r in runs])
    emit("flood", "lattice", "target_cpu_cores_baseline", [r["target_cpu_before"] for r in runs])
    emit("flood", "lattice", "target_cpu_cores_during", [r["target_cpu_during"] for r in runs])
    errors = [r["during"]["errors"] + r["after"]["errors"] for r in runs]
    emit("flood", "lattice", "honest_call_errors", errors)
    banned = [r["target"]["flooder_ip_banned"] for r in runs]
    print(json.dumps({"bench": "flood", "flooder_ip_banned_runs": sum(banned), "runs": len(runs),
                      "median_ratio_during_max": statistics.median(
                          max(r["during"][w] / r["before"][w] for w in ("ping_target", "rpc_target"))
                          for r in runs)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
