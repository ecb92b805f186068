"""The competitors: the original higher 0.2.1, TorchOpt 0.7.3 and JAX, installed for the benchmark only.

They are installed by :func:`setup` with ``pip install --target`` into the git-ignored folder
``.bench/`` (never into the environment, never dependencies of the package). The original
package also imports as ``higher``, so it is loaded under the name ``higher_original`` from its
own folder, which is never put on ``sys.path``: ``import higher`` keeps meaning this project.

JAX (``jax``, ``jaxlib``, ``optax`` for CPU, and their pure dependencies that the environment
lacks) goes into ``.bench/jax``; numpy and scipy are the environment's own (``--no-deps``, so pip
never installs a second numpy, nor torch). JAX is only ever imported in a child process that
:func:`jax_environment` sets up (the CPU backend, pinned to one core): see ``benchmarks/jax_workloads.py``.
On a GPU machine whose environment has JAX (``benchmarks/gpu_check.py``), the child process imports
that one instead, on the GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / ".bench"
ORIGINAL_DIR = BENCH_DIR / "original"  # higher 0.2.1, loaded as `higher_original`
SITE_DIR = BENCH_DIR / "site"  # TorchOpt and its pure dependencies, put on sys.path
JAX_DIR = BENCH_DIR / "jax"  # JAX for CPU and its pure dependencies (numpy, scipy: the environment's)

# Exact versions; --no-deps everywhere so that pip never touches torch.
ORIGINAL = ["higher==0.2.1"]
SITE = ["torchopt==0.7.3", "optree==0.20.0", "graphviz==0.21"]
# What pip resolves for jax 0.10.2 + optax 0.2.8, less numpy and scipy (in the environment already).
JAX = ["jax==0.10.2", "jaxlib==0.10.2", "optax==0.2.8", "ml_dtypes==0.6.0", "opt_einsum==3.4.0", "absl-py==2.5.1"]
_MARKER = BENCH_DIR / "installed.json"
_JAX_MARKER = BENCH_DIR / "installed-jax.json"


def installed() -> bool:
    """Whether :func:`setup` has installed exactly the pinned versions of higher 0.2.1 and TorchOpt."""
    try:
        return json.loads(_MARKER.read_text()) == {"original": ORIGINAL, "site": SITE}
    except (OSError, ValueError):
        return False


def jax_installed() -> bool:
    """Whether :func:`setup` has installed exactly the pinned versions of JAX (an optional competitor)."""
    try:
        return json.loads(_JAX_MARKER.read_text()) == {"jax": JAX}
    except (OSError, ValueError):
        return False


def _pip_install(target: Path, packages: list[str], quiet: bool) -> None:
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade", "--target", str(target)]
    command += (["-q"] if quiet else []) + packages
    print("setting up competitors:", " ".join(packages), "->", target.relative_to(ROOT), flush=True)
    subprocess.run(command, check=True)


def setup(quiet: bool = True, jax: bool = True) -> None:
    """Install the competitors into ``.bench/`` (needs the package index once; a no-op afterwards).

    ``jax=False`` leaves JAX out (about 100 MB; only ``benchmarks/compiled.py`` uses it).
    """
    if not installed():
        for target, packages in ((ORIGINAL_DIR, ORIGINAL), (SITE_DIR, SITE)):
            _pip_install(target, packages, quiet)
        _MARKER.write_text(json.dumps({"original": ORIGINAL, "site": SITE}))
    if jax and not jax_installed():
        _pip_install(JAX_DIR, JAX, quiet)
        _JAX_MARKER.write_text(json.dumps({"jax": JAX}))


#: XLA's documented one-thread flags. Not the default of the benchmark: on this CPU they make JAX
#: 2.4x slower even when it runs on a single core (they switch Eigen's matmuls off, not just
#: threads); the benchmark pins JAX to one core instead (see :func:`jax_environment`).
ONE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


#: Set by :func:`jax_environment` for the process it starts: where :func:`load_jax` takes JAX from,
#: ``"bench"`` (``.bench/jax``, the pinned version) or ``"environment"`` (the interpreter's own ``jax``).
JAX_SOURCE_VARIABLE = "HIGHER_BENCH_JAX"


def jax_environment(
    cpu: int | None = None, xla_flags: str = "", platform: str = "cpu", bundled: bool = True
) -> dict[str, str]:
    """The environment of a process that imports JAX: by default ``.bench/jax`` on its path, the CPU backend.

    ``cpu``: the one core the process pins itself to before importing JAX (``BENCH_CPU``), so
    that XLA runs on one core whatever its thread pools; ``xla_flags``: ``XLA_FLAGS``. XLA reads
    both when JAX is first imported, which is why JAX runs in a child process.

    ``platform``: ``JAX_PLATFORMS`` (``"cuda"`` on a GPU machine: ``benchmarks/gpu_check.py``);
    ``bundled=False``: the interpreter's own ``jax`` (a GPU image's CUDA build) instead of
    ``.bench/jax``. Off the CPU, JAX does not take 75% of the GPU memory at start
    (``XLA_PYTHON_CLIENT_PREALLOCATE=false``: torch shares the GPU) and computes float32 matmuls and
    convolutions in full float32 (``JAX_DEFAULT_MATMUL_PRECISION=highest``; its GPU default is
    TF32), as the torch side does: the same arithmetic for the timings and the meta-gradient check.
    """
    path = os.pathsep.join(p for p in (str(JAX_DIR) if bundled else "", os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": platform, "XLA_FLAGS": xla_flags, "OMP_NUM_THREADS": "1"}
    env[JAX_SOURCE_VARIABLE] = "bench" if bundled else "environment"
    if platform != "cpu":
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    if cpu is not None:
        env["BENCH_CPU"] = str(cpu)
    return env


def load_jax() -> ModuleType:
    """JAX in a process started with :func:`jax_environment`: 0.10.2 from ``.bench/jax``, or the environment's.

    Pins the process to the core ``BENCH_CPU`` names (if any) before the first import of JAX.
    """
    source = os.environ.get(JAX_SOURCE_VARIABLE)
    if source not in ("bench", "environment"):
        raise RuntimeError("JAX must be imported in a process started with competitors.jax_environment()")
    if "jax" not in sys.modules and os.environ.get("BENCH_CPU"):
        os.sched_setaffinity(0, {int(os.environ["BENCH_CPU"])})
    if source == "bench" and str(JAX_DIR) not in sys.path:
        sys.path.append(str(JAX_DIR))  # appended: numpy and scipy stay the environment's
    import jax

    if source == "bench" and jax.__version__ != "0.10.2":
        raise ImportError(
            f"expected JAX 0.10.2, found {jax.__version__} at {jax.__file__}; run benchmarks/run.py --setup"
        )
    precision = os.environ.get("JAX_DEFAULT_MATMUL_PRECISION")
    if precision:  # read from the environment by JAX too; set again in case this version does not
        jax.config.update("jax_default_matmul_precision", precision)
    return jax


def load_original() -> ModuleType:
    """higher 0.2.1 as the module ``higher_original`` (its imports are relative, so this is enough)."""
    if "higher_original" in sys.modules:
        return sys.modules["higher_original"]
    package = ORIGINAL_DIR / "higher"
    spec = importlib.util.spec_from_file_location(
        "higher_original", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    if spec is None or spec.loader is None or not package.exists():
        raise ImportError(f"higher 0.2.1 is not installed in {ORIGINAL_DIR}; run benchmarks/run.py --setup")
    module = importlib.util.module_from_spec(spec)
    sys.modules["higher_original"] = module
    spec.loader.exec_module(module)
    return module


def load_torchopt() -> ModuleType:
    """TorchOpt 0.7.3 from ``.bench/site``."""
    if str(SITE_DIR) not in sys.path:
        sys.path.append(str(SITE_DIR))  # appended: nothing there shadows the environment's packages
    import torchopt

    if torchopt.__version__ != "0.7.3":
        raise ImportError(f"expected TorchOpt 0.7.3, found {torchopt.__version__} at {torchopt.__file__}")
    return torchopt
