#!/usr/bin/env bash
# How much an untrained expert changes the model at step 0: a math expert trained one step at a
# learning rate of 1e-12 (so its weights are its start), run beside the backbone with its fresh
# gates (0.9 to the backbone), against the backbone alone, on 16 windows of 256 tokens of each
# held-out set of a demo folder. Prints one line per set: accuracy and loss, both, and the change.
#
#   scripts/step0_damage.sh [DEMO_DIR] [INIT]     # defaults: runs/demo-full copy
set -euo pipefail
DEMO="${1:-runs/demo-full}" INIT="${2:-copy}"
MODE="${MODE_BIN:-target/release/mode}"
D="$DEMO/data"
OUT="$(mktemp -d "${TMPDIR:-/tmp}/mode-step0.XXXXXX")"
trap 'rm -rf "$OUT"' EXIT
"$MODE" train --data "$D/math" --out "$OUT/math.expert.safetensors" --init "$INIT" --steps 1 --lr 1e-12 \
    --batch-tokens 256 --seq-len 128 --val-windows 1 --checkpoint-every 0 --blocks 3 \
    --expert-layers-per-block 2 --max-train-documents 8 >&2
sets=(--data "$D/math-test-answers" --data "$D/code" --data "$D/english" --data "$D/prose")
"$MODE" eval "${sets[@]}" --seq-len 256 --max-windows 16 --json > "$OUT/backbone.json"
"$MODE" eval --expert "$OUT/math.expert.safetensors" "${sets[@]}" --seq-len 256 --max-windows 16 --json \
    > "$OUT/expert.json"
python3 - "$OUT/backbone.json" "$OUT/expert.json" <<'PY'
import json, sys
b, e = (json.load(open(p)) for p in sys.argv[1:3])
for k in b:
    ab, ae = 100 * b[k]["next_token_accuracy"], 100 * e[k]["next_token_accuracy"]
    print(f"{k:20s} backbone {ab:6.2f} ({b[k]['loss']:.4f}) | with the expert {ae:6.2f} ({e[k]['loss']:.4f})"
          f" | {ae - ab:+.2f} points, {e[k]['loss'] - b[k]['loss']:+.4f} nats/token")
PY
