"""``python -m lattice.apps.gossip_sgd``: simulate (sim) or join a real run as one peer (peer); the same
commands as ``lattice-node gossip-sgd`` (lattice.apps.gossip_sgd.cli).

    python -m lattice.apps.gossip_sgd sim --algorithm dsgt --peers 16 --rounds 100 \\
        --log runs/dsgt.jsonl --plots runs/
    python -m lattice.apps.gossip_sgd peer --run demo --peers 8 --out /tmp/p1 --bootstrap /ip4/.../p2p/...
"""

from __future__ import annotations

import argparse
import sys

from lattice.apps.gossip_sgd.cli import add_subcommands, run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lattice.apps.gossip_sgd",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_subcommands(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    from lattice.errors import LatticeError

    try:
        return run_command(args)
    except (LatticeError, BaseExceptionGroup) as exc:
        error = exc
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]  # what trio makes of an error raised inside the node's nursery
        if not isinstance(error, LatticeError):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
