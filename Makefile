# Every target creates .venv on first use, so each is the only command a fresh machine needs.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-quick bench-scale bench-ann bench-gpu docs browser serve clean

$(STAMP): pyproject.toml lab/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install -e '.[test]' -e ./lab
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/demo.py

# Most tests wait on processes (Ray start-up, actors restarting, a lease expiring) more than they compute:
# on 2 cores two workers run the suite in about 15 min where one took about 18; four were no faster and
# Ray start-ups timed out.
# `worksteal` keeps a worker from idling behind a long fault test.
TEST_WORKERS ?= 2
test: $(STAMP) browser
	$(BIN)/ruff check pipeline lab jobs tests
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# Debian's Chromium for the search page's browser test (Playwright drives it; it downloads no browser).
# Where it cannot be installed (no root, no apt), the test is skipped and says why.
browser:
	@command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
		|| echo "make browser: could not install chromium; the browser test will be skipped"

serve: $(STAMP)
	$(BIN)/icar serve --output .demo/lancedb

bench: $(STAMP)
	$(BIN)/python jobs/bench.py
	$(BIN)/python jobs/bench_scale.py

# the write path as the work grows: commit cost over 20,000 shards, many tiny shards, two nodes on S3
bench-scale: $(STAMP)
	$(BIN)/python jobs/bench_scale.py

# ANN recall and latency on four distributions not shaped like the index, tuned vs LanceDB's defaults
# (results/bench/ann-<rows>.*); ROWS=10000000 for the largest float16 table this machine holds
ROWS ?= 1000000
bench-ann: $(STAMP)
	$(BIN)/python -m icar_lab.bench.ann --rows $(ROWS)

# one CUDA GPU: encoder A/B in fp16 (ViT-B-32, ViT-B-16, ViT-L-14) and 200 steps of `icar tune` on ViT-L-14
# (results/bench/gpu.json, the device named); under 8 minutes on one H100; refuses without CUDA
bench-gpu: $(STAMP)
	$(BIN)/python jobs/bench_gpu.py

bench-quick: $(STAMP)
	$(BIN)/python jobs/bench.py --quick

# README.md and docs/ from the latest results/ and pipeline/config.py's field descriptions (run after a bench)
docs: $(STAMP)
	$(BIN)/python lab/studies/readme.py

lint: $(STAMP)
	$(BIN)/ruff check pipeline lab jobs tests

clean:
	rm -rf $(VENV) .demo build *.egg-info lab/*.egg-info
