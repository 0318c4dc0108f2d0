# Two commands for a new user:  `make quickstart`  (set up, then train SFT -> GRPO -> eval)
#                               `make test`        (set up, then run the default test tier)
# Everything is installed into .venv; nothing to install by hand.

PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a CUDA machine use e.g. `make TORCH=torch quickstart`.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/hybrid-rl
PYTEST_ARGS ?=

.PHONY: quickstart test test-slow test-all test-deps install bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Headless Chromium renders report.html in the dashboard tests (Debian's package).
test-deps:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { echo "installing Debian's chromium for the report tests"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

quickstart: install
	$(CLI) pipeline

test: install test-deps
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: install test-deps
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: install test-deps
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(CLI) bench model
	$(CLI) bench memory
	$(CLI) bench rollout
	$(CLI) bench grpo --steps 5 --dtypes fp32 bf16 --rounds 5

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
