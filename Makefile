# Two entry points: `make demo` runs the main job end to end, `make test` runs the test suite.
# Both create .venv and install the package with pinned constraints on first use.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo demo-cli test lint install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable ".[dev]"
	touch $@

# The embedded default: Airflow on SQLite and MLflow's sqlite store, both under .airflow/ (not ~/airflow).
AIRFLOW_ENV = AIRFLOW_HOME=$(CURDIR)/.airflow AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags \
	AIRFLOW__CORE__LOAD_EXAMPLES=False PATH=$(CURDIR)/$(BIN):$$PATH

demo: install
	$(AIRFLOW_ENV) $(BIN)/airflow db migrate > /dev/null
	$(AIRFLOW_ENV) $(BIN)/airflow pools set grid_fits $$(nproc) "airflow-grid candidate fits" --include-deferred > /dev/null
	$(AIRFLOW_ENV) $(BIN)/python -m airflow_grid.demo

demo-cli: install
	$(BIN)/airflow-grid run dags/specs/digits_model_family.yaml --out out/digits

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q
