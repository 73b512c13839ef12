# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# The panel's JavaScript: shipped built in rf_notebook/static/, rebuilt from js/src by `make js` (and by `make test`).
js/node_modules/.installed: js/package.json js/package-lock.json
	cd js && npm ci --no-audit --no-fund --loglevel=error
	touch $@

.PHONY: install js demo test bench
install: $(VENV)/.installed

js: js/node_modules/.installed
	cd js && npm run build --silent

demo: $(VENV)/.installed
	$(PY) -m rf_notebook.demo

test: $(VENV)/.installed js
	cd js && npm test --silent
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) -m bench
