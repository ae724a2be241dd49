#!/usr/bin/env bash
# Server throughput, `mode serve` next to llama.cpp's `llama-server` on the same weights, the same number of
# parallel slots and threads, the same chat requests (scripts/check_openai_client.py's load phase: CLIENTS
# concurrent clients, each asking again as soon as it has its answer, for SECONDS each).
#
# The two alternate: ROUNDS rounds, each ours at every client count, then the peer at every client count,
# so that load on the machine hits both alike. Every round gives one ratio ours / peer of completion tokens/s
# per client count; the last line is one JSON object with, per client count, the median of the per-round
# ratios, their spread (min, max), and the medians of each side's own tokens/s and p50 latency.
#
#   bench/serve.sh                           # the default Q4_1 file on both sides, 3 rounds, 1/8/32 clients, 30 s each
#   WEIGHT_DTYPE=q8_0 ROUNDS=5 bench/serve.sh  # both on the file requantised to Q8_0
#
# Weights: ours loads the default backbone's GGUF (SmolLM2-135M-Instruct, Q4_1) with --weight-dtype
# WEIGHT_DTYPE (default q4_1: the file's own blocks). The peer loads the same file requantised to Q8_0 by
# llama-quantize (cached under $MODE_HOME/peer) for q8_0, and the Q4_1 file itself otherwise (q4_1 holds its
# blocks again; llama.cpp has no f32 path worth comparing against; the report names the file each side used).
# The peer is built once by bench/peer/build_llama_cpp.sh (about 15 minutes on 2 free cores).
# Both sides reuse the keys and values of prompts already read (ours: --prompt-cache-mib, on by default;
# llama-server: its slots' `cache_prompt`, true by default), so each request reads only what follows the
# chat template and system prompt it shares with the others.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-3}"
CLIENTS="${CLIENTS:-1,8,32}"
SECONDS_EACH="${SECONDS_EACH:-30}"
MAX_TOKENS="${MAX_TOKENS:-64}"
PARALLEL="${PARALLEL:-32}"
THREADS="${THREADS:-2}"
WEIGHT_DTYPE="${WEIGHT_DTYPE:-q4_1}"
MODE_HOME="${MODE_HOME:-$HOME/.cache/mode}"
MODE="${CARGO_TARGET_DIR:-target}/release/mode"

cargo build --release --quiet
scripts/fetch_backbone.sh >/dev/null
SOURCE="$MODE_HOME/backbones/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$SOURCE" ] || { echo "serve.sh: $SOURCE is missing after scripts/fetch_backbone.sh" >&2; exit 1; }
BIN=$(bench/peer/build_llama_cpp.sh | tail -n 1)

PEER_GGUF="$SOURCE"
[ "$WEIGHT_DTYPE" = q8_0 ] && PEER_GGUF=$(bench/peer/q8_0_gguf.sh "$SOURCE")

common=(--clients "$CLIENTS" --seconds "$SECONDS_EACH" --max-tokens "$MAX_TOKENS")
rows=()
for round in $(seq 1 "$ROUNDS"); do
    ours=$(MODE_THREADS="$THREADS" python3 scripts/check_openai_client.py --mode "$MODE" "${common[@]}" \
        --serve-arg=--backbone --serve-arg="$SOURCE" --serve-arg=--parallel --serve-arg="$PARALLEL" \
        --serve-arg=--weight-dtype --serve-arg="$WEIGHT_DTYPE" | grep '^{' | tail -n 1)
    echo "round $round/$ROUNDS mode: $ours"
    peer=$(python3 scripts/check_openai_client.py --llama-server "$BIN/llama-server" --gguf "$PEER_GGUF" \
        --parallel "$PARALLEL" --peer-threads "$THREADS" "${common[@]}" | grep '^{' | tail -n 1)
    echo "round $round/$ROUNDS peer: $peer"
    rows+=("$ours" "$peer")
done
python3 - "$WEIGHT_DTYPE" "$SOURCE" "$PEER_GGUF" "${rows[@]}" <<'PY'
import json, sys
sys.path.insert(0, "bench")
from ratios import median, ratio_summary
dtype, source, peer_gguf, rows = sys.argv[1], sys.argv[2], sys.argv[3], [json.loads(a) for a in sys.argv[4:]]
ours, peer = rows[0::2], rows[1::2]

out = {"ours": f"{source} as {dtype}", "peer": f"llama-server on {peer_gguf}", "rounds": len(ours),
       "clients": {}}
for i, level in enumerate(ours[0]["load"]):
    o = [r["load"][i]["completion_tokens_per_sec"] for r in ours]
    p = [r["load"][i]["completion_tokens_per_sec"] for r in peer]
    ratio = ratio_summary(o, p)
    out["clients"][level["clients"]] = {
        "ratio_median": ratio["median"], "ratio_min": ratio["min"], "ratio_max": ratio["max"],
        "ours_tokens_per_sec": median(o), "peer_tokens_per_sec": median(p),
        "ours_p50_s": median([r["load"][i]["latency_p50_s"] for r in ours]),
        "peer_p50_s": median([r["load"][i]["latency_p50_s"] for r in peer]),
        "failures": sum(r["load"][i]["failures"] for r in ours + peer),
    }
    # What each side spent: prompt tokens it ran (not held by its prompt cache), completion tokens per
    # request, and the CPU cores it and the load generator (Python clients on the same machine) used.
    for side, rs in (("ours", ours), ("peer", peer)):
        for key in ("prompt_tokens_read_per_sec", "completion_tokens_per_request", "server_cores",
                    "client_cores"):
            values = [r["load"][i].get(key) for r in rs]
            if all(v is not None for v in values):
                out["clients"][level["clients"]][f"{side}_{key}"] = median(values)
print(json.dumps(out))
PY
