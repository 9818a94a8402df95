# shapserve: `make run` (service + worker + a model), `make test` (the whole suite).
# The venv and the install are scripts/install.sh's (PYTHON=python3.12 to pick the interpreter).
PYTHON ?=
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test lint run train replicas bench clean

$(VENV)/.installed: pyproject.toml
	VENV=$(VENV) PYTHON=$(PYTHON) FORCE=1 scripts/install.sh

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q tests

# Redis (unless one answers), a model (trained first if the registry is empty), worker(s), API.
# Settings from the environment or the command line: `make run DATA=path TRAIN_MINUTES=5 PORT=8080`
# (all of them: `scripts/run.sh help`). Ctrl-C stops everything.
run: install
	@SKIP_INSTALL=1 VENV=$(VENV) scripts/run.sh up

# Train with the full profile (paper on a CUDA machine, else cpu), evaluate, promote: a running
# `make run` switches to the new version by itself.
train: install
	@SKIP_INSTALL=1 VENV=$(VENV) scripts/run.sh train

# Scaled out on this machine: two API replicas behind HAProxy, WORKERS workers, one Redis, over
# the registry's promoted version (`make run` or `make train` first). Settings: scripts/replicas.sh.
replicas: install
	@VENV=$(VENV) scripts/replicas.sh

clean:
	rm -rf $(VENV) .pytest_cache var
