# The two set-up commands of the README: `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
PYTHON ?= python3

.PHONY: install demo run test lint fmt clean bench install-service

# llama-cpp-python is built for this CPU with a build profile (EDGE_AGENT_LLAMA_PROFILE=safe|native|
# portable; docs/operations.md); `edge-agent doctor` then runs every tensor type through it in child
# processes and stops the install, naming the types, when one crashes or computes garbage here.
$(VENV)/.installed: pyproject.toml scripts/install-llama.sh scripts/system-deps.sh agent/hardware/build_profile.py
	bash scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	bash scripts/install-llama.sh $(PY)
	$(PY) -m pip install -q -e '.[demo,dev]'
	$(BIN)/edge-agent doctor
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

# As root on the box: dedicated user, venv in /opt/edge-agent, units, /etc/edge-agent/config.toml,
# then enable and start the socket and the service (docs/operations.md). HUB=1 adds edge-hub.service.
install-service:
	bash systemd/install.sh $(if $(filter 1,$(HUB)),--hub)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
