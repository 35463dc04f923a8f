# mailsvc: `make run` starts the server on its embedded default config,
# `make test` runs the test suite. Each sets up .venv on first use.

PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
CONFIG ?= etc/mailsvc.toml

.PHONY: run test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# compat mode puts the project root on sys.path, so Twisted finds twisted/plugins/ here.
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

run: $(BIN)/.installed
	$(BIN)/twistd -n --pidfile= mailsvc --config $(CONFIG)

test: $(BIN)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(BIN)/.installed
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) var build *.egg-info
