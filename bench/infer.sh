#!/usr/bin/env bash
# Inference speed of `mode` next to Hugging Face `generate` (PyTorch eager, f32) on the same machine and the
# same GGUF, with the same thread count. Not part of CI: the peer needs the 4.6 GiB venv of
# scripts/reference/setup_venv.sh.
#
# The two alternate: ROUNDS rounds, each `mode bench infer --runs 1` then `hf_generate.py --runs 1` (each a
# fresh process: one warm-up run, then one timed run), so that load on the machine hits both alike. Every
# round gives one ratio ours / peer per metric (prefill and decode tokens/s); the last line is one JSON
# object with, per metric, the median of the per-round ratios and their spread (min, max), and the medians
# of each side's own tokens/s.
#
#   bench/infer.sh [THREADS]                        # default 2; SmolLM2-135M, 5 rounds
#   BACKBONE=gemma3-270m bench/infer.sh 2           # Gemma 3 270M (base model: plain-text prompt, BOS first)
#   ROUNDS=9 NEW_TOKENS=64 bench/infer.sh           # defaults: ROUNDS=5, NEW_TOKENS=64
#   PEER=llama WEIGHT_DTYPE=q8_0 bench/infer.sh     # the peer is llama.cpp's llama-bench instead
#   PEER=llama WEIGHT_DTYPE=q4_1 bench/infer.sh     # both on the default Q4_1 file's own blocks
#   PEER=llama STREAMS=8,32 WEIGHT_DTYPE=q4_1 bench/infer.sh   # also N sequences decoded together
#
# PEER=llama: the peer is llama-bench (bench/peer/build_llama_cpp.sh) on the same GGUF, or on it requantised to
# Q8_0 when ours runs with WEIGHT_DTYPE=q8_0 (bench/peer/q8_0_gguf.sh); `-p PROMPT_TOKENS -n NEW_TOKENS -r 1`,
# so its prefill and decode are measured separately, as ours are. WEIGHT_DTYPE (default f32) is ours'
# --weight-dtype.
#
# BACKBONE: a name `mode` knows (smollm2-135m, the default; gemma3-270m) or a .gguf path; the peer loads the
# GGUF that ours reports having loaded. STREAMS (PEER=llama only): also the aggregate decode tokens/s of N
# sequences decoded together after the same prompt, ours `--streams N` (one batched step per token, as `mode
# serve` runs) and the peer's llama-batched-bench `-npp PROMPT_TOKENS -ntg NEW_TOKENS -npl N` (S_TG t/s).
# Prompt: SmolLM2's GGUF has a chat template and the peer uses its 37-token ChatML prompt; for a GGUF
# without one (Gemma 3 270M) the peer's prompt is PROMPT_TOKENS (default 37) tokens: BOS + the text `mode bench infer` uses. Ours always decodes after a prompt of the same length
# (`--prompt-tokens`). EVAL_TOKENS (unset: mode's default) only sizes ours' evaluation figure, which the
# peer does not measure.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${1:-2}"
BACKBONE="${BACKBONE:-smollm2-135m}"
ROUNDS="${ROUNDS:-5}"
NEW_TOKENS="${NEW_TOKENS:-64}"
PROMPT_TOKENS="${PROMPT_TOKENS:-37}"
MODE="${CARGO_TARGET_DIR:-target}/release/mode"
PEER="${PEER:-hf}"
STREAMS="${STREAMS:-}"
if [ -n "$STREAMS" ] && [ "$PEER" != llama ]; then
    echo "infer.sh: STREAMS needs PEER=llama (the transformers peer decodes one sequence)" >&2
    exit 1
fi
WEIGHT_DTYPE="${WEIGHT_DTYPE:-f32}"
PY=scripts/reference/.venv/bin/python
if [ "$PEER" = hf ]; then
    [ -x "$PY" ] || scripts/reference/setup_venv.sh >&2
else
    LLAMA_BIN=$(bench/peer/build_llama_cpp.sh | tail -n 1)
fi

cargo build --release --quiet
eval_flags=()
[ -n "${EVAL_TOKENS:-}" ] && eval_flags=(--eval-tokens "$EVAL_TOKENS" --seq-len "$EVAL_TOKENS")
[ -n "$STREAMS" ] && eval_flags+=(--streams "$STREAMS")
rows=()
GGUF=""
for round in $(seq 1 "$ROUNDS"); do
    ours=$("$MODE" --threads "$THREADS" bench infer --backbone "$BACKBONE" --prompt-tokens "$PROMPT_TOKENS" \
        --new-tokens "$NEW_TOKENS" --runs 1 --weight-dtype "$WEIGHT_DTYPE" "${eval_flags[@]}" --json)
    echo "round $round/$ROUNDS mode: $ours"
    if [ -z "$GGUF" ]; then
        GGUF=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["backbone"])' "$ours")
        case "$GGUF" in
            *.gguf) ;;
            *) echo "infer.sh: the peer needs a GGUF backbone, ours loaded $GGUF" >&2; exit 1 ;;
        esac
    fi
    if [ "$PEER" = hf ]; then
        peer=$(OMP_WAIT_POLICY=PASSIVE "$PY" bench/peer/hf_generate.py --gguf "$GGUF" --threads "$THREADS" \
            --prompt-tokens "$PROMPT_TOKENS" --max-new-tokens "$NEW_TOKENS" --runs 1 | tail -n 1)
    else
        PEER_GGUF="$GGUF"
        [ "$WEIGHT_DTYPE" = q8_0 ] && PEER_GGUF=$(bench/peer/q8_0_gguf.sh "$GGUF")
        peer=$("$LLAMA_BIN/llama-bench" -m "$PEER_GGUF" -t "$THREADS" -p "$PROMPT_TOKENS" -n "$NEW_TOKENS" \
            -r 1 -o json | python3 -c '
import json, sys
tests = json.load(sys.stdin)
pp = [t["avg_ts"] for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0]
tg = [t["avg_ts"] for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0]
print(json.dumps({"gguf": sys.argv[1], "prefill_tokens_per_sec": pp[0], "decode_tokens_per_sec": tg[0]}))
' "$PEER_GGUF")
        if [ -n "$STREAMS" ]; then
            most=$(tr ',' '\n' <<< "$STREAMS" | sort -n | tail -n 1)
            peer=$("$LLAMA_BIN/llama-batched-bench" -m "$PEER_GGUF" -t "$THREADS" -npp "$PROMPT_TOKENS" \
                -ntg "$NEW_TOKENS" -npl "$STREAMS" -c $(( most * (PROMPT_TOKENS + NEW_TOKENS) + 64 )) 2>/dev/null \
                | python3 -c '
import json, sys
row = json.loads(sys.argv[1])
batched = {}
for line in sys.stdin:
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 10 and cells[2].isdigit():
        batched[cells[2]] = float(cells[7])
row["batched_decode_tokens_per_sec"] = batched
print(json.dumps(row))
' "$peer")
        fi
    fi
    echo "round $round/$ROUNDS peer: $peer"
    rows+=("$ours" "$peer")
done
python3 - "$BACKBONE" "$PEER" "$WEIGHT_DTYPE" "${rows[@]}" <<'PY'
import json, sys
sys.path.insert(0, "bench")
from ratios import median, ratio_summary
backbone, peer_name, dtype, rows = sys.argv[1], sys.argv[2], sys.argv[3], [json.loads(a) for a in sys.argv[4:]]
ours, peer = rows[0::2], rows[1::2]

out = {"backbone": backbone, "weight_dtype": dtype, "peer": peer_name, "gguf": peer[0]["gguf"], "threads": ours[0]["threads"], "rounds": len(ours),
       "prompt_tokens": ours[0]["prompt_tokens"], "new_tokens": ours[0]["new_tokens"]}
for metric in ("decode", "prefill"):
    key = f"{metric}_tokens_per_sec"
    out[f"ratio_{metric}"] = ratio_summary([o[key] for o in ours], [p[key] for p in peer])
    out[key] = {"mode": round(median([o[key] for o in ours]), 1), peer_name: round(median([p[key] for p in peer]), 1)}
for n in ours[0].get("batched_decode_tokens_per_sec", {}):
    a = [o["batched_decode_tokens_per_sec"][n] for o in ours]
    b = [p["batched_decode_tokens_per_sec"][n] for p in peer]
    out[f"ratio_decode_{n}_streams"] = ratio_summary(a, b)
    out[f"decode_{n}_streams_tokens_per_sec"] = {"mode": round(median(a), 1), peer_name: round(median(b), 1)}
print(json.dumps(out))
PY
