# make test : create .venv, install pinned dependencies and the package, run the suite.
# make bench: run the benchmark sweep.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
BENCH_DEPS := $(VENV)/.bench-deps-installed

.PHONY: test install bench clean

$(DEPS): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(DEPS)

# The package in editable mode, then the C++ extension fused_lora._C built in place
# (ninja from the venv; incremental). FUSED_LORA_SKIP_EXT=1 skips the extension.
install: $(DEPS)
	FUSED_LORA_SKIP_EXT=1 $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	@if [ "$$FUSED_LORA_SKIP_EXT" != "1" ]; then \
		PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) setup.py --quiet build_ext --inplace; fi

# The suite covers the benchmark harness too, so it needs the bench extras.
test: install $(BENCH_DEPS)
	$(PY) -m pytest -q tests

$(BENCH_DEPS): $(DEPS) requirements-bench.txt
	$(PY) -m pip install --quiet -r requirements-bench.txt
	touch $(BENCH_DEPS)

# The default sweep on the best device present (CUDA if available, else CPU);
# results in bench/results/scratch/ (untracked; $(PY) -m bench --publish writes bench/results/).
# More options: $(PY) -m bench --help
bench: install $(BENCH_DEPS)
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info
