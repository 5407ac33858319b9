# The commands the README quotes. `make demo` and `make test` each install everything first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Portable llama.cpp build (no -march=native), so the wheel pip caches works on any x86-64.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,dev]'
	touch $@

install: $(BIN)/.installed

# Set up, then run the real job on the embedded model: results in out/demo/.
demo: install
	$(BIN)/python -m jobs.make_demo_data data/demo-candidates.csv --rows 24
	$(BIN)/python -m flows.batch_inference --config jobs/demo.yaml

# Set up, then run the whole test suite. pytest's exit 5 (no tests collected) is not a failure.
test: install
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# Everything except the tests that load the real model or start a real Prefect server.
test-fast: install
	$(BIN)/python -m pytest -ra -m "not model and not server and not soak" $(PYTEST_ARGS)

# Throughput benchmark (not a test; ~14 min on 2 cores): JSON on stdout and in bench/results/<UTC>.json.
# BENCH_ARGS=--quick for a ~3 min run; `python -m bench.benchmark --compare OLD NEW` compares two results.
bench: install
	$(BIN)/python -m bench.benchmark $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check flows tasks tests deployments jobs bench
	$(BIN)/ruff format --check flows tasks tests deployments jobs bench
	$(BIN)/mypy  # flows, tasks, deployments: [tool.mypy] in pyproject.toml

clean:
	rm -rf out data .pytest_cache
