#!/usr/bin/env bash
# mypy over src/ (the [tool.mypy] section of pyproject.toml) with trio's and outcome's own inline
# types. The dev dependency libp2p pulls in trio-typing, whose stale trio-stubs and outcome-stubs
# (for trio < 0.22) would otherwise take precedence; MYPYPATH comes first.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
python3 - "$dir" <<'PY'
import importlib.util
import os
import sys

for name in ("trio", "outcome"):
    spec = importlib.util.find_spec(name)
    os.symlink(os.path.dirname(spec.origin), os.path.join(sys.argv[1], name))
PY
MYPYPATH="$dir" python3 -m mypy "$@"
