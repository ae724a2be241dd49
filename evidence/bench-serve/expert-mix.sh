#!/usr/bin/env bash
# Mixed expert sets vs backbone alone at 32 clients, alternating rounds (issue 17's second must-show).
cd /work/main
E=/tmp/mix/experts
common=(--mode target/release/mode --clients 32 --seconds 20 --max-tokens 64 --serve-arg=--parallel --serve-arg=32 --serve-arg=--weight-dtype --serve-arg=q4_1)
for r in 1 2 3 4 5; do
  m=$(MODE_THREADS=2 python3 scripts/check_openai_client.py "${common[@]}" --expert-mix --serve-arg=--expert --serve-arg=$E/english.expert.safetensors --serve-arg=--expert --serve-arg=$E/code.expert.safetensors | grep '^{' | tail -n 1)
  echo "round $r mixed: $m"
  p=$(MODE_THREADS=2 python3 scripts/check_openai_client.py "${common[@]}" | grep '^{' | tail -n 1)
  echo "round $r plain: $p"
done
