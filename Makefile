# Omnistitch developer entry points. `make setup` is idempotent; every other target runs it first.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NATIVE_STAMP := $(VENV)/.native
NATIVE_SOURCES := $(wildcard native/src/*.rs) native/Cargo.toml native/Cargo.lock native/pyproject.toml
KAFKA := $(PY) deploy/kafka/localkafka.py
RUN_DIR := .run
PYTEST_ARGS ?=

.PHONY: help setup lock kafka-up kafka-down run test test-unit test-integration bench lint format schemas clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $@

# the native link engine (Rust, native/): built where cargo >= 1.85 is; without it the core runs in Python alone
$(NATIVE_STAMP): $(NATIVE_SOURCES) | $(STAMP)
	@if $(PY) tests/native_toolchain.py; then \
		echo "building the native engine (native/, cargo)"; $(PY) -m pip install -q ./native && touch $@; \
	else echo "no cargo >= 1.85: the native engine is not built; the core runs in Python (native/README.md)"; fi

deploy/kafka/.classpath: deploy/kafka/pom.xml | $(PY)
	$(KAFKA) classpath

setup: $(STAMP) $(NATIVE_STAMP) deploy/kafka/.classpath ## venv + pinned Python deps + native engine (with cargo) + broker jars

lock: | $(PY) ## re-pin constraints.txt from a fresh resolve of pyproject.toml
	rm -rf $(RUN_DIR)/lockenv && $(PYTHON) -m venv $(RUN_DIR)/lockenv
	$(RUN_DIR)/lockenv/bin/pip install -q --upgrade pip && $(RUN_DIR)/lockenv/bin/pip install -q ".[dev]"
	$(RUN_DIR)/lockenv/bin/pip freeze --exclude omnistitch > constraints.txt && rm -rf $(RUN_DIR)/lockenv

kafka-up: setup ## start the local broker (127.0.0.1:9092 when free) in .run/kafka
	@$(KAFKA) up --state-dir $(RUN_DIR)/kafka --port 9092

kafka-down: | $(PY) ## stop the local broker
	@$(KAFKA) down --state-dir $(RUN_DIR)/kafka

run: setup ## broker (unless KAFKA_BOOTSTRAP is set) + topics + one worker + a demo feed; Ctrl-C stops all
	@bash deploy/run-local.sh

test: setup ## unit + integration tests against a broker the tests start (and always stop)
	@trap '$(KAFKA) down --state-dir $(RUN_DIR)/test-kafka' EXIT; \
	status=0; $(PY) -m pytest tests $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing" >&2; fi; \
	exit $$status

test-unit: setup ## unit tests only (no broker)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: setup ## integration tests only, against a broker they start (and always stop)
	@trap '$(KAFKA) down --state-dir $(RUN_DIR)/test-kafka' EXIT; $(PY) -m pytest tests/integration $(PYTEST_ARGS)

schemas: setup ## regenerate schemas/json and schemas/asyncapi.yaml from the pydantic contracts
	$(PY) -m streams.cli schemas

bench: setup ## benchmarks: print figures (see BENCHMARKS.md)
	@for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script; done

lint: setup ## ruff + mypy (strict on streams/ and schemas/); rustfmt + clippy on native/ where cargo is
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	@if $(PY) tests/native_toolchain.py && cargo clippy --version >/dev/null 2>&1; then \
		cd native && cargo fmt --check && cargo clippy --release --quiet -- -D warnings; \
	else echo "native/ not linted: needs cargo >= 1.85 with rustfmt and clippy"; fi

format: setup ## apply ruff's formatting and autofixes
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean: kafka-down ## stop the broker, remove local state and the native engine's build directory
	rm -rf $(RUN_DIR) .state native/target
