# `make test` and `make demo` do their own set-up: a .venv with torch from PyPI (its CUDA build also runs on CPU),
# the matching torchvision, and this package with its dev extra.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torchvision pins the torch release it was built against; naming it first keeps pip off any CPU-only torch wheel
# lying in a local find-links folder (that one has no matching torchvision).
TORCH_SPEC ?= torchvision==0.29.2
PYTEST_ARGS ?=

.PHONY: venv test demo lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: venv
	$(BIN)/beitv2 quickstart --out demo_out

lint: venv
	$(BIN)/ruff check src tests benchmarks

bench: venv
	$(BIN)/python benchmarks/bench_train_step.py

clean:
	rm -rf $(VENV) demo_out runs
