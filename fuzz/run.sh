#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 600 s each) with cargo-fuzz (nightly).
# Not part of CI. Crashing inputs land in fuzz/artifacts/TARGET/; keep each as a regression
# test once fixed. Usage: fuzz/run.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
secs="${1:-600}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf expert_file data_readers)
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    echo "fuzz: $t for ${secs}s" >&2
    cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=4096 -timeout=30 -print_final_stats=1
done
