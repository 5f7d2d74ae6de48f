# pcmx: the two commands a new user runs (README): `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP_RUN  := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: demo test docs bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP_RUN): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(STAMP_TEST): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@ $(STAMP_RUN)

demo: $(STAMP_RUN)
	$(PY) -m pcmx.demo --output demo-output --overwrite

test: $(STAMP_TEST)
	$(PY) -m pytest -q

docs: | $(PY)
	$(PY) -m pip install --quiet -e ".[docs]"
	$(PY) docs/gen_cli.py
	$(VENV)/bin/mkdocs build --strict

bench: $(STAMP_RUN)
	$(PY) benchmarks/run_all.py

lint: | $(PY)
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check pcmx tests benchmarks

clean:
	rm -rf $(VENV) demo-output site build *.egg-info
