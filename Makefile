# The README's two commands (and the edit loop's test-fast). Each creates .venv (if missing), installs the project
# into it and runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: test test-fast demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

# The full suite (CI runs it), with the 15 slowest tests listed at the end.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 tests --durations=15

# The edit loop: the optimizer core, the models and the data, without slow or multi-process tests (markers in
# pyproject.toml); a few minutes on 2 cores.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 -m "not slow and not multiprocess" tests/core tests/models tests/data --durations=5

demo: $(STAMP)
	$(VENV)/bin/clsvd demo --out runs/demo

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) runs
