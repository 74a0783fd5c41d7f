# Two commands do all the setup on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= def parse_args(argv):

.PHONY: install demo test bench build-models

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned: this exact version is a local CPU wheel; a range would pull CUDA builds.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/outrider generate "$(PROMPT)" --max-new-tokens 128 --compare

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/outrider bench --json bench-out/bench.json

build-models: $(STAMP)
	$(BIN)/outrider build-models
