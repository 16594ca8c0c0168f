# The two commands: `make demo` and `make test`. Each sets up everything it needs from nothing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test chaos bench lint typecheck schemas clean venv device-prep

venv: $(STAMP)

# torch/torchvision first and pinned, so pip takes the builds on this machine's disk and never
# resolves a multi-gigabyte download for a looser range.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[tools,tracing,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mmsent demo

test: $(STAMP)
	$(BIN)/python -m scripts.ensure_redis
	$(BIN)/ruff check consumer mmsent schemas tooling tests scripts
	$(BIN)/mypy consumer mmsent schemas tooling
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

chaos: $(STAMP)
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

# PASSIVE: idle OpenMP threads sleep instead of spinning. The naive consumer's 2-thread kernels otherwise spin
# against the broker on these 2 cores (model call 35-42 ms -> ~400-750 ms per post): a penalty that is not its own.
bench: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/mmsent bench all --write BENCHMARKS.md

lint: $(STAMP)
	$(BIN)/ruff check consumer mmsent schemas tooling tests scripts

typecheck: $(STAMP)
	$(BIN)/mypy consumer mmsent schemas tooling

# What travels to a lent GPU host (.device/, git-ignored; carry it with the device tool): scripts/device_check.py.
device-prep: $(STAMP)
	$(BIN)/python -m scripts.device_check --prepare

schemas: $(STAMP)
	$(BIN)/mmsent schema --write schemas/json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
