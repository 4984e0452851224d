"""bench/wan_hol: small calls while a bulk upload runs on the same connection, on a shaped link.

    python bench/wan_hol.py [--preset continental] [--upload-mib 128] [--calls 40]

Two daemons on a WAN testbed preset (lattice.testing.wan); daemon a uploads ``--upload-mib`` to b
(`rpc.bench` up) in one thread while it makes ``--calls`` 8-byte echo calls to b in another. Every
frame shares one TCP connection, so a small call waits behind what the bulk writer queued: in the
muxer, and in the kernel (up to trio's TCP_NOTSENT_LOWAT, 16 KiB, unsent). One JSON line: the
idle call, the call during the upload (median, p90), the upload's MiB/s, in ms and link RTTs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wan import start_host

from lattice import Client
from lattice.testing.wan import WanTestbed

MIB = 1 << 20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="continental")
    parser.add_argument("--upload-mib", type=int, default=128)
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, WanTestbed(["a", "b"], args.preset) as tb:
        rtt = tb.rtt_ms("a", "b")
        a = start_host(tb, Path(tmp), "a", "--enable-bench")
        b = start_host(tb, Path(tmp), "b", "--enable-bench")
        try:
            peer = b.info["addrs"][0]
            with Client(a.info["control"], timeout=1800) as client:
                client.connect(peer)
                idle = client.rpc.bench(peer, 8, count=30, direction="echo")["median_s"]
                upload: dict = {}

                def bulk() -> None:
                    with Client(a.info["control"], timeout=1800) as other:
                        upload.update(other.rpc.bench(peer, args.upload_mib * MIB, count=1, direction="up"))

                thread = threading.Thread(target=bulk)
                thread.start()
                time.sleep(1.0)  # the upload is under way
                during = client.rpc.bench(peer, 8, count=args.calls, direction="echo")["times_s"]
                thread.join()
        finally:
            a.stop()
            b.stop()
    ms = sorted(t * 1000 for t in during)
    median, p90 = statistics.median(ms), ms[int(0.9 * (len(ms) - 1))]
    print(json.dumps({
        "bench": "wan_hol", "preset": args.preset, "rtt_ms": rtt, "idle_call_ms": round(idle * 1000, 1),
        "call_during_upload_ms": round(median, 1), "call_during_upload_p90_ms": round(p90, 1),
        "call_during_upload_rtts": round(median / rtt, 2),
        "upload_mib_s": round(args.upload_mib / upload["times_s"][0], 1),
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
