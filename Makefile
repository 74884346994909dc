# msif-lab. `make run` executes every notebook; `make test` runs the tests. Both set up .venv first.
#   make run PROFILE=paper      full-size settings (GPU when available)
#   make setup                  .venv with the package and its pinned dependencies, and the data folder
#   make data                   (re)prepare the data folder: MNIST and CIFAR-10, offline
#   make clean                  delete outputs/ (executed notebooks, figures, results, cache); keeps .venv and data

PYTHON ?= python3
VENV ?= .venv
PROFILE ?= default
BIN := $(VENV)/bin
DATA_DIR := $(or $(MSIF_DATA_DIR),data)
SETUP_STAMP := $(VENV)/.msif-setup-stamp
DATA_STAMP := $(DATA_DIR)/.msif-prepared
TEST_ENV := TQDM_DISABLE=1 MPLBACKEND=Agg MSIF_PROFILE=test

.PHONY: setup data run test clean

setup: $(SETUP_STAMP) $(DATA_STAMP)

# Re-installs only when pyproject.toml changes (or .venv is gone).
$(SETUP_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

# Prepared once (again when what is prepared changes); `make data` forces a check (fast when all is there).
$(DATA_STAMP): msif_lab/data.py msif_lab/text.py | $(SETUP_STAMP)
	$(BIN)/python -m msif_lab data
	touch $@

data: $(SETUP_STAMP)
	$(BIN)/python -m msif_lab data
	touch $(DATA_STAMP)

run: setup
	$(BIN)/python -m msif_lab run --profile $(PROFILE)

test: setup
	$(TEST_ENV) $(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-current-env

clean:
	rm -rf outputs .pytest_cache
	find msif_lab tests -name __pycache__ -type d -prune -exec rm -rf {} +
