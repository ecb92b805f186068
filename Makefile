# Two commands for a fresh clone:  make demo  (install and run the main job)  /  make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The fresh environment into which `make check-wheel` installs the built wheel.
WHEEL_VENV ?= .venv-wheel
SHARED ?= ../shared
export OMP_NUM_THREADS ?= 1

.PHONY: demo example test test-torch coverage fuzz typecheck dist check-wheel check-shared bench bench-compiled gpu-check lint docs install install-demo install-dev install-bench install-docs clean

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

install-docs: $(PY)
	$(PY) -m pip install -q -c constraints.txt -e ".[docs]"

# The main job: MAML on sinusoid regression with the paper's 70,000 iterations, table and PNG
# (higher-demo.png); see README.
demo: install-demo
	$(PY) -m higher demo

# The worked example of copy_initial_weights / track_higher_grads (prints, no plots).
example: install
	$(PY) examples/copy_initial_weights.py

# The suite runs on every core (pytest-xdist, one worker per core; --dist loadgroup would keep the tests
# of one xdist_group on one worker, for a fixture they must share: none needs it today).
PYTEST_XDIST ?= -n auto --dist loadgroup
test: install-dev
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_XDIST)
	$(MAKE) typecheck VENV=$(VENV)

# The suite under coverage.py (pytest-cov, on every core as make test): the line coverage of each file of
# src/higher and the total. (What runs in the tests' subprocesses, such as the gloo ranks, is not counted.)
coverage: install-dev
	$(PY) -m pytest -q $(PYTEST_XDIST) --cov=src/higher --cov-report=term

# The differential-testing harness (tests/differential) on fresh random problems instead of the fixed sample
# that `make test` runs, and many more of them: FUZZ=k draws k times the default counts (about 40 minutes
# for FUZZ=1 on the 2-core machine). Failures are kept in .hypothesis/ and replayed first by the next run.
FUZZ ?= 1
fuzz: install-dev
	HIGHER_FUZZ=$(FUZZ) $(PY) -m pytest -q tests/differential -p no:cacheprovider

# The whole suite under another torch release: `make test-torch TORCH=2.11.0`. Its virtual environment
# (TORCH_VENV, outside the repository, kept between runs) gets that torch from the package index (releases
# other than the pinned CPU build come as CUDA builds, a few GB; they run on the CPU) and the [dev] extra's
# tools; the suite imports the package from src/ (PYTHONPATH), so nothing is installed into the checkout.
TORCH ?= 2.11.0
TORCH_VENV ?= $(HOME)/.cache/higher/venv-torch-$(TORCH)
test-torch:
	test -x $(TORCH_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install -q "torch==$(TORCH)" \
	  $$($(TORCH_VENV)/bin/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['dev'])")
	$(TORCH_VENV)/bin/python -c "import torch; assert torch.__version__.split('+')[0] == '$(TORCH)', torch.__version__"
	PYTHONPATH=$(CURDIR)/src $(TORCH_VENV)/bin/python -m pytest -q $(PYTEST_XDIST) -p no:cacheprovider

# ruff over the repository (declared phony before, but had no rule: `make lint` did nothing).
lint: install-dev
	$(PY) -m ruff check .

# pyright over src/ (configured in pyproject.toml: basic mode, every file).
typecheck: install-dev
	$(PY) -m pyright --project pyproject.toml --pythonpath $(PY)

# The sdist and the wheel, into dist/.
dist: install-dev
	rm -rf dist
	$(PY) -m build --outdir dist .

# Installs the built wheel (not the source tree) into a fresh virtual environment, with the pinned
# CPU torch, and runs the seed example and a short demo from it, outside the repository.
check-wheel: check-shared dist
	rm -rf $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q -c constraints.txt "$$(ls dist/higher-*.whl)[demo]"
	cd "$$(mktemp -d)" && $(CURDIR)/$(WHEEL_VENV)/bin/python -c "import higher, importlib.resources as r, sys; \
	  assert '$(WHEEL_VENV)/lib' in higher.__file__, higher.__file__; \
	  assert r.files('higher').joinpath('py.typed').is_file(), 'py.typed missing from the wheel'; \
	  print('wheel installed:', higher.__version__, higher.__file__)"
	$(SHARED)/acceptance/check_seed.sh $(WHEEL_VENV)/bin/python
	cd "$$(mktemp -d)" && $(CURDIR)/$(WHEEL_VENV)/bin/python -m higher demo --iterations 50 --no-progress --json \
	  --out demo.png | tail -n 1 | $(CURDIR)/$(WHEEL_VENV)/bin/python -c "import json, sys; \
	  r = json.load(sys.stdin); assert r['options']['iterations'] == 50 and 'MAML' in r['table'], r; \
	  print('demo from the wheel: MSE after 1 step', round(r['table']['MAML']['1 step']['mean'], 3))"
	cd "$$(mktemp -d)" && $(CURDIR)/$(WHEEL_VENV)/bin/higher demo --help > /dev/null && echo "the higher command works"

# The seed example's check lives outside the repository, in $(SHARED) (../shared beside a CI clone):
# say so before building anything rather than fail after the build.
check-shared:
	@test -x "$(SHARED)/acceptance/check_seed.sh" || { echo "make check-wheel runs $(SHARED)/acceptance/check_seed.sh" \
	  "(the seed example, kept outside the repository), which is not there: pass SHARED=/path/to/shared" >&2; exit 2; }

# Installs the competitors (higher 0.2.1, TorchOpt 0.7.3) into .bench/ on first use, then
# times every workload (about 20 minutes on 2 cores); writes .bench/results.md and .bench/benchmark.png.
bench: install-bench
	$(PY) benchmarks/run.py $(BENCH_ARGS)

# Compiled meta-iterations (torch.compile through the public API) against JAX; see docs/performance-compiled.md.
bench-compiled: install-bench
	$(PY) benchmarks/run.py --setup
	$(PY) benchmarks/compiled.py $(BENCH_ARGS)

# One prepared run for a lent GPU (benchmarks/gpu_check.py; docs/gpu.md), at most 9 minutes: the environment, the
# device tests (pytest -k cuda), meta-iterations per task / task-batched / compiled against the hand-written loop,
# vmap and JAX on the device, and the demo; gpu-check.json and gpu-check.md into $(OUT) (default .gpu-check/).
# The GPU image has torch and JAX but no package index, so nothing is installed: no virtual environment, no
# `pip install -e .` (with build isolation pip would fetch setuptools); the package is imported from src/. Its
# python is $(PYTHON) there; here, where .venv exists, .venv's. `make gpu-check DEVICE=cpu QUICK=1`: the dry run
# on CPU with small sizes (the suite runs it: tests/test_benchmarks_gpu_check.py).
DEVICE ?= cuda
QUICK ?= 0
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	PYTHONPATH="src:.$${PYTHONPATH:+:$$PYTHONPATH}" $(GPU_PYTHON) benchmarks/gpu_check.py --device $(DEVICE) \
	  $(if $(filter 1,$(QUICK)),--quick) $(if $(OUT),--out "$(OUT)") $(GPU_CHECK_ARGS)

# The documentation site (mkdocs.yml, docs/): into site/, strictly (a broken link, a missing page or an
# unresolved API reference fails the build). Nothing is downloaded at build time. Open site/index.html.
docs: install-docs
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(WHEEL_VENV) build dist site src/*.egg-info .pytest_cache .ruff_cache .bench .coverage .coverage.* .gpu-check
