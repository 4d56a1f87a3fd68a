# The README's two commands. Each creates .venv (if missing), installs the project into it and runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: test demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 tests

demo: $(STAMP)
	$(VENV)/bin/clsvd demo --out runs/demo

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) runs
