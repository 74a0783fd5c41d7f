# Two commands do all the setup on a fresh machine: `make demo` and `make test`.
# `make demo` is the main job: a local Ray cluster with a node per role serving the
# bundled pair over gRPC, answering a first streamed request (`make stop` stops it).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= def parse_args(argv):

.PHONY: install demo stop generate test bench bench-server build-models

$(STAMP): pyproject.toml setup.py $(wildcard protos/outrider/v1/*.proto)
	$(PY) -m venv $(VENV)
	# torch first, pinned: this exact version is a local CPU wheel; a range would pull CUDA builds.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/outrider serve --detach

stop: $(STAMP)
	$(BIN)/outrider stop

generate: $(STAMP)
	$(BIN)/outrider generate "$(PROMPT)" --max-new-tokens 128 --compare

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/outrider bench --json bench-out/bench.json

bench-server: $(STAMP)
	$(BIN)/outrider bench --server 127.0.0.1:9000 --gammas 4,6,8 --repeat 3 --json bench-out/server.json

build-models: $(STAMP)
	$(BIN)/outrider build-models
