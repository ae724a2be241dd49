#!/usr/bin/env bash
# Inference speed of `mode` next to Hugging Face `generate` (PyTorch eager, f32) on the same machine,
# run back to back with the same thread count. Not part of CI: the peer needs the 4.6 GiB venv of
# scripts/reference/setup_venv.sh. Ends with one JSON line of ratios (ours / peer, medians).
#
#   bench/infer.sh [THREADS]      # default 2
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${1:-2}"
MODE="${CARGO_TARGET_DIR:-target}/release/mode"
GGUF="$(scripts/fetch_backbone.sh)"
PY=scripts/reference/.venv/bin/python
[ -x "$PY" ] || scripts/reference/setup_venv.sh >&2

cargo build --release --quiet
# The peer's prompt is the 37-token chat prompt; ours decodes after a prompt of the same length.
ours=$("$MODE" --threads "$THREADS" bench infer --prompt-tokens 37 --new-tokens 64 --runs 5 --json)
echo "mode: $ours"
peer=$(OMP_WAIT_POLICY=PASSIVE "$PY" bench/peer/hf_generate.py --gguf "$GGUF" --threads "$THREADS" \
    --max-new-tokens 64 --runs 5 | tail -n 1)
echo "peer: $peer"
python3 - "$ours" "$peer" <<'PY'
import json, sys
ours, peer = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(json.dumps({
    "threads": ours["threads"],
    "decode_tokens_per_sec": {"mode": round(ours["decode_tokens_per_sec"], 1), "hf": round(peer["decode_tokens_per_sec"], 1)},
    "prefill_tokens_per_sec": {"mode": round(ours["prefill_tokens_per_sec"], 1), "hf": round(peer["prefill_tokens_per_sec"], 1)},
    "ratio_decode": round(ours["decode_tokens_per_sec"] / peer["decode_tokens_per_sec"], 2),
    "ratio_prefill": round(ours["prefill_tokens_per_sec"] / peer["prefill_tokens_per_sec"], 2),
}))
PY
