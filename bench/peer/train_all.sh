#!/usr/bin/env bash
# PyTorch peer of `mode bench train`: training-step speed of SmolLM2-135M (or the GGUF in $GGUF, e.g. Gemma 3
# 270M) (f32, seq 256 x batch 2, AdamW) in three modes, branch, full and lora, each in its own process (so peak
# RSS is per mode), with bench/peer/torch_train.py. Prints one JSON line per mode on stdout and nothing else;
# progress goes to stderr. Not part of CI: it needs the 4.6 GiB venv of scripts/reference/setup_venv.sh (created
# here if missing) and takes a few minutes. bench/train.sh calls it once per mode and round (MODES=one mode).
#
#   bench/peer/train_all.sh [THREADS]          # default 2
#   STEPS=6 WARMUP=1 bench/peer/train_all.sh 2 # total steps per mode, of which WARMUP untimed (defaults 6 and 1)
#   SELF_CHECK=1 bench/peer/train_all.sh       # first check the hand-written decoder loop against HF (~20 s)
#   MODES="branch" bench/peer/train_all.sh     # a subset of the modes
#   GGUF=~/.cache/mode/backbones/gemma3-270m/gemma-3-270m-q4_k_m.gguf bench/peer/train_all.sh   # Gemma 3 270M
#   SEQ=64 BATCH=1 bench/peer/train_all.sh     # other sizes (defaults 256 and 2)
set -euo pipefail
cd "$(dirname "$0")/../.."
THREADS="${1:-2}"
STEPS="${STEPS:-6}"
WARMUP="${WARMUP:-1}"
SEQ="${SEQ:-256}"
BATCH="${BATCH:-2}"
PEFT_VERSION=0.21.2
PY=scripts/reference/.venv/bin/python
log() { echo "train_all: $*" >&2; }

if [ ! -x "$PY" ]; then
    log "no venv at scripts/reference/.venv; creating it (about 2.6 GiB download)"
    scripts/reference/setup_venv.sh >&2
fi
# peft is not part of setup_venv.sh. --no-deps: its dependencies are all in the venv already, and without it
# pip would pull torch's CUDA wheels and triton again.
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('peft') != '$PEFT_VERSION')" 2>/dev/null; then
    log "installing peft==$PEFT_VERSION into the venv"
    "$PY" -m pip --disable-pip-version-check install --no-deps "peft==$PEFT_VERSION" >&2
fi
GGUF="${GGUF:-$(scripts/fetch_backbone.sh)}"
export OMP_WAIT_POLICY=PASSIVE

if [ "${SELF_CHECK:-0}" = "1" ]; then
    log "self-check"
    "$PY" bench/peer/torch_train.py --self-check --gguf "$GGUF" --threads "$THREADS" >&2
fi
log "load average: $(cut -d' ' -f1-3 /proc/loadavg); $(basename "$GGUF"), threads $THREADS, $STEPS steps per mode ($WARMUP warm-up), seq $SEQ x batch $BATCH"
for mode in ${MODES:-branch full lora}; do
    log "mode $mode"
    line="$("$PY" bench/peer/torch_train.py --mode "$mode" --threads "$THREADS" --steps "$STEPS" \
        --warmup "$WARMUP" --seq "$SEQ" --batch "$BATCH" --gguf "$GGUF" | tail -n 1)"
    case "$line" in
        "{"*) echo "$line" ;;
        *) log "mode $mode printed no JSON line (got: $line)"; exit 1 ;;
    esac
done
