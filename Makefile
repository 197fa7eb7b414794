# `make test` and `make demo` do all the set-up themselves: the Debian package with Fashion-MNIST (when missing and
# this machine allows installing it), a .venv with torch from PyPI (its CUDA build also runs on CPU), the matching
# torchvision, and this package with its dev extra.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torchvision pins the torch release it was built against; naming it first keeps pip off any CPU-only torch wheel
# lying in a local find-links folder (that one has no matching torchvision).
TORCH_SPEC ?= torchvision==0.29.2
PYTEST_ARGS ?=
# pytest exits 5 when it collected no tests; ALLOW_NO_TESTS=1 (what .ci/run passes) counts that as success.
ALLOW_NO_TESTS ?=
# Fashion-MNIST IDX files (Debian package dataset-fashion-mnist). Overridable so the set-up logic can be tested
# without touching the machine: FMNIST_DIR, FMNIST_PKG, APT_GET, and IS_ROOT (non-empty = may install packages).
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
FMNIST_PKG ?= dataset-fashion-mnist
APT_GET ?= apt-get
IS_ROOT ?= $(shell [ "$$(id -u)" = 0 ] && echo yes)
FMNIST_CMD = $(APT_GET) update -qq && $(APT_GET) install -y -qq $(FMNIST_PKG)

.PHONY: venv data test demo lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

data:
	@if [ -d "$(FMNIST_DIR)" ]; then exit 0; fi; \
	if [ -n "$(IS_ROOT)" ] && command -v $(APT_GET) >/dev/null 2>&1; then \
	  echo "installing $(FMNIST_PKG) (Fashion-MNIST into $(FMNIST_DIR))"; \
	  export DEBIAN_FRONTEND=noninteractive; $(FMNIST_CMD) || exit 1; \
	  [ -d "$(FMNIST_DIR)" ] || { echo "error: $(FMNIST_PKG) installed but $(FMNIST_DIR) is missing" >&2; exit 1; }; \
	else \
	  echo "error: Fashion-MNIST is missing ($(FMNIST_DIR)) and this user cannot install it; run as root:" >&2; \
	  echo "  $(FMNIST_CMD)" >&2; exit 1; \
	fi

test: venv data
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ] && [ -n "$(ALLOW_NO_TESTS)" ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

demo: venv data
	$(BIN)/beitv2 quickstart --out demo_out

lint: venv
	$(BIN)/ruff check src tests benchmarks

bench: venv
	$(BIN)/python benchmarks/bench_train_step.py

clean:
	rm -rf $(VENV) demo_out runs
