# make test : create .venv, install pinned dependencies and the package, run the suite.
# make bench: run the benchmark sweep.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed

.PHONY: test install bench clean

$(DEPS): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(DEPS)

install: $(DEPS)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
