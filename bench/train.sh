#!/usr/bin/env bash
# Training speed of `mode` next to the PyTorch peer (bench/peer/torch_train.py) on this machine: the three
# modes of `mode bench train` (frozen backbone + branch, full fine-tuning, LoRA r16 on all linear layers),
# sequence 256 x batch 2, f32, AdamW, same thread count, same GGUF. Not run by CI (the peer needs the
# reference venv).
#
# The two alternate: ROUNDS rounds; in each, for each mode, ours then the peer, each one process that takes
# WARMUP untimed steps and STEPS - WARMUP timed ones and reports the median of its timed steps (one
# measurement). Every round gives one ratio ours / PyTorch (tokens/s) per mode; the last line is one JSON
# object with, per mode, the median of the per-round ratios and their spread (min, max), the medians of each
# side's tokens/s and CPU-seconds per step, and our MFU and both peak RSS for the branch mode (medians).
#
#   bench/train.sh [THREADS]                     # default 2; SmolLM2-135M; ROUNDS=3 STEPS=6 WARMUP=1
#   BACKBONE=gemma3-270m bench/train.sh 2        # Gemma 3 270M
#   MODES="branch lora" SEQ=64 BATCH=1 bench/train.sh   # a subset of the modes, other sizes (defaults 256, 2)
#
# BACKBONE: a name `mode` knows (smollm2-135m, the default; gemma3-270m) or a .gguf path; the peer loads the
# GGUF that ours reports having trained on.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${1:-2}"
BACKBONE="${BACKBONE:-smollm2-135m}"
ROUNDS="${ROUNDS:-3}"
STEPS="${STEPS:-6}"
WARMUP="${WARMUP:-1}"
SEQ="${SEQ:-256}"
BATCH="${BATCH:-2}"
MODES="${MODES:-branch full lora}"
MODE="${CARGO_TARGET_DIR:-target}/release/mode"
PY=scripts/reference/.venv/bin/python
[ -x "$PY" ] || scripts/reference/setup_venv.sh >&2
cargo build --release --quiet

results=()
GGUF=""
for round in $(seq 1 "$ROUNDS"); do
    for mode in $MODES; do
        ours=$("$MODE" --threads "$THREADS" bench train --backbone "$BACKBONE" --mode "$mode" \
            --seq-len "$SEQ" --batch "$BATCH" --steps "$((STEPS - WARMUP))" --warmup "$WARMUP" 2>/dev/null)
        echo "round $round/$ROUNDS mode:    $ours"
        if [ -z "$GGUF" ]; then
            GGUF=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["weights"])' "$ours")
            case "$GGUF" in
                *.gguf) ;;
                *) echo "train.sh: the peer needs a GGUF backbone, ours trained on $GGUF" >&2; exit 1 ;;
            esac
        fi
        peer=$(GGUF="$GGUF" STEPS="$STEPS" WARMUP="$WARMUP" SEQ="$SEQ" BATCH="$BATCH" MODES="$mode" \
            bench/peer/train_all.sh "$THREADS" 2>/dev/null | tail -n 1)
        echo "round $round/$ROUNDS pytorch: $peer"
        results+=("$ours" "$peer")
    done
done
python3 - "$BACKBONE" "${results[@]}" <<'PY'
import json, sys
backbone, rows = sys.argv[1], [json.loads(a) for a in sys.argv[2:]]
ours, peer = rows[0::2], rows[1::2]
modes = list(dict.fromkeys(r["mode"] for r in ours))

def median(xs):  # the upper one of an even count, as mode's own medians
    return sorted(xs)[len(xs) // 2]

out = {"backbone": backbone, "gguf": peer[0]["gguf"], "threads": ours[0]["threads"],
       "rounds": len(ours) // len(modes), "tokens_per_step": ours[0]["tokens_per_step"]}
for m in modes:
    pairs = [(o, p) for o, p in zip(ours, peer) if o["mode"] == m]
    assert all(p["mode"] == m for _, p in pairs)
    ratios = [o["tokens_per_sec"] / p["tokens_per_sec"] for o, p in pairs]
    out[f"ratio_{m}"] = {"median": round(median(ratios), 3), "min": round(min(ratios), 3),
                         "max": round(max(ratios), 3), "rounds": [round(r, 3) for r in ratios]}
    out[f"tokens_per_sec_{m}"] = {"mode": round(median([o["tokens_per_sec"] for o, _ in pairs]), 1),
                                  "pytorch": round(median([p["tokens_per_sec"] for _, p in pairs]), 1)}
out["cpu_sec_per_step"] = {
    m: {side: round(median([r["cpu_sec_per_step"] for r in rs if r["mode"] == m]), 2)
        for side, rs in (("mode", ours), ("pytorch", peer))} for m in modes}
if "branch" in modes:
    b = [(o, p) for o, p in zip(ours, peer) if o["mode"] == "branch"]
    out["mfu_branch"] = round(median([o["mfu"] for o, _ in b]), 3)
    out["rss_mib_branch"] = {"mode": round(median([o["peak_rss_mib"] for o, _ in b])),
                             "pytorch": round(median([p["peak_rss_mib"] for _, p in b]))}
print(json.dumps(out))
PY
