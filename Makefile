# Two commands for a fresh clone:  make demo  (install and run the main job)  /  make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: demo example test bench lint install install-demo install-dev install-bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -m pip install -q -c constraints.txt -e .

install-dev: $(PY)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"

install-demo: $(PY)
	$(PY) -m pip install -q -c constraints.txt -e ".[demo]"

install-bench: $(PY)
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]"

# The main job: MAML on sinusoid regression, table and PNG (higher-demo.png); see README.
demo: install-demo
	$(PY) -m higher demo

# The worked example of copy_initial_weights / track_higher_grads (prints, no plots).
example: install
	$(PY) examples/copy_initial_weights.py

test: install-dev
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# Installs the competitors (higher 0.2.1, TorchOpt 0.7.3) into .bench/ on first use, then
# times every workload (about 20 minutes on 2 cores); writes .bench/results.md and .bench/benchmark.png.
bench: install-bench
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .bench
