# The two set-up commands of the README: `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
PYTHON ?= python3

.PHONY: install demo run test lint fmt clean bench

$(VENV)/.installed: pyproject.toml scripts/install-llama.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	bash scripts/install-llama.sh $(PY)
	$(PY) -m pip install -q -e '.[demo,dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/edge-agent demo

run: demo
	$(BIN)/edge-agent run

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
