# Every target creates .venv on first use, so each is the only command a fresh machine needs.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-quick clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/demo.py

test: $(STAMP)
	$(BIN)/ruff check pipeline jobs tests
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python jobs/bench.py

bench-quick: $(STAMP)
	$(BIN)/python jobs/bench.py --quick

lint: $(STAMP)
	$(BIN)/ruff check pipeline jobs tests

clean:
	rm -rf $(VENV) .demo build *.egg-info
