# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# The known-good set (constraints.txt) for development and CI; pyproject.toml holds the supported ranges.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

# sdist + wheel in dist/
dist: $(VENV)/.installed
	rm -rf dist
	$(PY) -m build --outdir dist . > /dev/null
	@ls -l dist

# The built wheel (not the source tree) in a fresh virtualenv with the lowest supported versions
# (constraints-lowest.txt): the demo runs from it, and the exactness, conformance and IC-op tests run against it.
LOWEST ?= .venv-lowest
test-lowest: dist
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install --quiet --upgrade pip
	$(LOWEST)/bin/python -m pip install --quiet -c constraints-lowest.txt dist/*.whl pytest hypothesis
	cd $$(mktemp -d) && $(abspath $(LOWEST))/bin/python -m rf_notebook.demo --max-steps 16 --num-chunks 2
	RF_NOTEBOOK_INSTALLED=1 $(LOWEST)/bin/pytest -q tests/test_versions.py tests/test_exactness.py \
		tests/test_conformance.py tests/test_ic_ops.py

# The panel's JavaScript: shipped built in rf_notebook/static/, rebuilt from js/src by `make js` (and by `make test`).
js/node_modules/.installed: js/package.json js/package-lock.json
	cd js && npm ci --no-audit --no-fund --loglevel=error
	touch $@

.PHONY: install js demo test bench dist test-lowest
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
