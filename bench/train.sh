#!/usr/bin/env bash
# Training speed of `mode` next to the PyTorch peer (bench/peer/torch_train.py) on this machine:
# the three modes of `mode bench train` (frozen backbone + branch, full fine-tuning, LoRA r16 on
# all linear layers), SmolLM2-135M, sequence 256 x batch 2, f32, AdamW, same thread count.
# Ours and the peer alternate per mode so that both see the same machine load. Not run by CI
# (the peer needs the reference venv). Ends with one JSON line of ratios (ours / PyTorch,
# tokens/s medians) and our MFU.
#
#   bench/train.sh [THREADS]      # default 2; STEPS=6 WARMUP=1 by default
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${1:-2}"
STEPS="${STEPS:-6}"
WARMUP="${WARMUP:-1}"
MODE="${CARGO_TARGET_DIR:-target}/release/mode"
PY=scripts/reference/.venv/bin/python
[ -x "$PY" ] || scripts/reference/setup_venv.sh >&2
cargo build --release --quiet
scripts/fetch_backbone.sh >/dev/null

results=()
for mode in branch full lora; do
    ours=$("$MODE" --threads "$THREADS" bench train --mode "$mode" --steps "$((STEPS - WARMUP))" --warmup "$WARMUP" 2>/dev/null)
    echo "mode:    $ours"
    peer=$(STEPS="$STEPS" WARMUP="$WARMUP" MODES="$mode" bench/peer/train_all.sh "$THREADS" 2>/dev/null | tail -n 1)
    echo "pytorch: $peer"
    results+=("$ours" "$peer")
done
python3 - "${results[@]}" <<'PY'
import json, sys
rows = [json.loads(a) for a in sys.argv[1:]]
ours = {r["mode"]: r for r in rows if "peer" not in r}
peer = {r["mode"]: r for r in rows if "peer" in r}
out = {f"ratio_{m if m != 'branch' else 'branch'}": round(ours[m]["tokens_per_sec"] / peer[m]["tokens_per_sec"], 3)
       for m in ("branch", "full", "lora")}
out = {"ratio_branch": out["ratio_branch"], "ratio_full": out["ratio_full"], "ratio_lora": out["ratio_lora"],
       "mfu_branch": round(ours["branch"]["mfu"], 3),
       "rss_mib_branch": {"mode": round(ours["branch"]["peak_rss_mib"]), "pytorch": round(peer["branch"]["peak_rss_mib"])},
       "cpu_sec_per_step": {m: {"mode": round(ours[m]["cpu_sec_per_step"], 2), "pytorch": round(peer[m]["cpu_sec_per_step"], 2)}
                            for m in ("branch", "full", "lora")}}
print(json.dumps(out))
PY
