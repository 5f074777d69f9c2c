# AdaStream — `make demo` and `make test` do all the set-up themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Local tests run Ray without token auth; never set this on a shared cluster.
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes, so a second `make setup` takes no time.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The main job on the embedded defaults: synthetic benchmark (generated once), local Ray, local MLflow.
demo: setup
	$(PY) pipelines/train.py

test: setup
	$(PY) -m pytest tests

test-fast: setup
	$(PY) -m pytest tests -m "not slow"

bench: setup
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/input_pipeline.py
	$(PY) benchmarks/adafocus_v2.py

clean:
	rm -rf $(VENV) data/synthetic data/ci-synthetic runs mlflow.db .pytest_cache
