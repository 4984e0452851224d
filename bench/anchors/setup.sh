#!/usr/bin/env bash
# bench/anchors/setup.sh: create the anchor venvs (Lattica, hivemind) used by the benchmarks.
#
#   LATTICE_ANCHOR_DIR=/some/dir bash bench/anchors/setup.sh
#
# Idempotent: a venv that already holds the pinned version is left alone. Quiet unless an
# install fails, in which case it prints pip's log tail and exits non-zero.
# Creates:  $LATTICE_ANCHOR_DIR/.venv-lattica   (lattica==1.0.21)
#           $LATTICE_ANCHOR_DIR/.venv-hivemind  (torch==2.13.0 CPU, hivemind==1.1.12; ships p2pd)
set -euo pipefail

ANCHOR_DIR="${LATTICE_ANCHOR_DIR:-$HOME/.cache/lattice-anchors}"
PYTHON="${LATTICE_ANCHOR_PYTHON:-python3}"
LATTICA_VERSION=1.0.21
HIVEMIND_VERSION=1.1.12
TORCH_VERSION=2.13.0   # the CPU build of this exact pin is on local disk; anything else pulls GBs

mkdir -p "$ANCHOR_DIR"
LOG="$ANCHOR_DIR/setup.log"
: >"$LOG"

fail() {
    echo "bench/anchors/setup.sh: $1" >&2
    echo "--- last lines of $LOG ---" >&2
    tail -n 30 "$LOG" >&2 || true
    exit 1
}

# has_pkg VENV DIST VERSION: true if DIST is installed in VENV at VERSION (local tag such as
# "+cpu" ignored: the local torch file is 2.13.0+cpu).
has_pkg() {
    "$1/bin/python" - "$2" "$3" >>"$LOG" 2>&1 <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    sys.exit(0 if version(sys.argv[1]).split("+")[0] == sys.argv[2] else 1)
except PackageNotFoundError:
    sys.exit(1)
PY
}

make_venv() {
    local venv="$1"
    if [ ! -x "$venv/bin/python" ]; then
        "$PYTHON" -m venv "$venv" >>"$LOG" 2>&1 || fail "could not create venv $venv with $PYTHON"
    fi
}

pip_install() {
    local venv="$1"; shift
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$@" >>"$LOG" 2>&1 \
        || fail "pip install $* into $venv failed"
}

# --- Lattica ---------------------------------------------------------------------------
LAT="$ANCHOR_DIR/.venv-lattica"
make_venv "$LAT"
if ! has_pkg "$LAT" lattica "$LATTICA_VERSION"; then
    pip_install "$LAT" "lattica==$LATTICA_VERSION"
    has_pkg "$LAT" lattica "$LATTICA_VERSION" || fail "lattica==$LATTICA_VERSION not importable after install"
fi

# --- hivemind --------------------------------------------------------------------------
HIV="$ANCHOR_DIR/.venv-hivemind"
make_venv "$HIV"
if ! has_pkg "$HIV" torch "$TORCH_VERSION"; then
    # torch first and alone, pinned, so hivemind's own "torch>=..." requirement is already met.
    pip_install "$HIV" "torch==$TORCH_VERSION"
fi
if ! has_pkg "$HIV" hivemind "$HIVEMIND_VERSION"; then
    pip_install "$HIV" "torch==$TORCH_VERSION" "hivemind==$HIVEMIND_VERSION"
    has_pkg "$HIV" hivemind "$HIVEMIND_VERSION" || fail "hivemind==$HIVEMIND_VERSION not importable after install"
fi
has_pkg "$HIV" torch "$TORCH_VERSION" || fail "torch is not $TORCH_VERSION in $HIV (another build was pulled in)"
P2PD="$("$HIV/bin/python" -c 'import hivemind, os; print(os.path.join(os.path.dirname(hivemind.__file__), "hivemind_cli", "p2pd"))' 2>>"$LOG")" \
    || fail "hivemind does not import in $HIV"
[ -x "$P2PD" ] || fail "p2pd binary missing at $P2PD"
