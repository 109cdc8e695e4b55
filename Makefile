# flywheel: the two commands a fresh machine needs are `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
export FLYWHEEL_HOME ?= $(CURDIR)/.flywheel
export DAGSTER_HOME ?= $(FLYWHEEL_HOME)/dagster

.PHONY: setup setup-extras demo test test-spark test-monitor test-fast ui mlflow-ui postgres benchmark clean

setup: $(VENV)/.installed

# The pinned stack (requirements.lock, resolved from pyproject.toml) installed with uv, compiled to
# bytecode: every run, daemon and dbt process imports it, and uv (and PYTHONDONTWRITEBYTECODE) would
# otherwise leave each one compiling Dagster, GX and MLflow from source (an import took 20 s, now 6).
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check uv
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	touch $@

# The optional extras the full suite exercises (the transformer trainer, dbt and the cycle on Spark),
# pinned in requirements-extras.lock. torch's CPU wheel: from /opt/wheels where the machine keeps it,
# otherwise PyTorch's CPU index (PyPI's torch is the CUDA build, about 3 GB).
TORCH_SOURCE := $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
setup-extras: $(VENV)/.extras
$(VENV)/.extras: $(VENV)/.installed requirements-extras.lock
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python $(TORCH_SOURCE) -r requirements.lock -r requirements-extras.lock
	touch $@

demo: setup
	$(BIN)/flywheel demo

# The full suite on two workers (tests/conftest.py groups the modules), with the slowest tests named.
# The Spark tests (a cycle on Spark against an S3 server) run where Java 17+ and Debian's s3fs are
# installed and are skipped, saying so, where they are not (.ci/run says how to install them).
test: setup setup-extras
	$(BIN)/pytest -q -n 2 --dist loadgroup --no-loadscope-reorder --durations=15 -m "not monitor_daemon"

# The Spark tests alone (about 8 minutes).
test-spark: setup setup-extras
	$(BIN)/pytest -q -n 0 -m spark --durations=5

test-monitor: setup
	$(BIN)/pytest -q -n 0 -m monitor_daemon --durations=5

# Before each commit: the tests not marked slow (no cycle, no Dagster services, no database server).
test-fast: setup
	$(BIN)/pytest -q -n 2 -m "not slow" --durations=5

# The Dagster UI on http://localhost:$(UI_PORT) with a code server and the daemon (sensors, run queue);
# Ctrl-C or SIGTERM stops every process it started (flywheel_pipeline.launcher.serve_ui).
UI_PORT ?= 3000
ui: setup
	$(BIN)/flywheel ui --port $(UI_PORT)

# The home's MLflow store (sqlite, or PostgreSQL under the production profile), as the pipeline sees it.
HOME_SAYS = $(BIN)/python -c 'from flywheel_pipeline.home import Home; print(Home.from_env().$(1))'
mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri "$$($(call HOME_SAYS,mlflow_tracking_uri))" \
		--default-artifact-root "$$($(call HOME_SAYS,mlflow_artifact_uri))"

# A local PostgreSQL for the production profile (docs/deploying.md); prints the variables to export.
postgres:
	scripts/postgres.sh start

benchmark: setup
	$(BIN)/python benchmarks/label_model.py
	$(BIN)/python benchmarks/redaction.py
	$(BIN)/python benchmarks/scale.py --events 1000000
	$(BIN)/python benchmarks/importers.py --rows 1000000

clean:
	rm -rf $(FLYWHEEL_HOME)
