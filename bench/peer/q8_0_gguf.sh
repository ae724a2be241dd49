#!/usr/bin/env bash
# Prints the path of SOURCE.gguf requantised to Q8_0 by llama.cpp's llama-quantize (the peer's copy of the
# weights that `mode --weight-dtype q8_0` holds), made once and cached under $MODE_HOME/peer.
#
#   bench/peer/q8_0_gguf.sh ~/.cache/mode/backbones/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
set -euo pipefail
SOURCE="$1"
[ -f "$SOURCE" ] || { echo "q8_0_gguf: $SOURCE: no such file" >&2; exit 1; }
MODE_HOME="${MODE_HOME:-$HOME/.cache/mode}"
BIN=$("$(dirname "$0")/build_llama_cpp.sh" | tail -n 1)
OUT="$MODE_HOME/peer/$(basename "$SOURCE" .gguf).requantised-Q8_0.gguf"
if [ ! -f "$OUT" ]; then
    mkdir -p "$(dirname "$OUT")"
    "$BIN/llama-quantize" --allow-requantize "$SOURCE" "$OUT.tmp" Q8_0 >&2
    mv "$OUT.tmp" "$OUT"
fi
echo "$OUT"
