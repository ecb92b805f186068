"""The competitors: the original higher 0.2.1 and TorchOpt 0.7.3, installed for the benchmark only.

They are installed by :func:`setup` with ``pip install --target`` into the git-ignored folder
``.bench/`` (never into the environment, never dependencies of the package). The original
package also imports as ``higher``, so it is loaded under the name ``higher_original`` from its
own folder, which is never put on ``sys.path``: ``import higher`` keeps meaning this project.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / ".bench"
ORIGINAL_DIR = BENCH_DIR / "original"  # higher 0.2.1, loaded as `higher_original`
SITE_DIR = BENCH_DIR / "site"  # TorchOpt and its pure dependencies, put on sys.path

# Exact versions; --no-deps everywhere so that pip never touches torch.
ORIGINAL = ["higher==0.2.1"]
SITE = ["torchopt==0.7.3", "optree==0.20.0", "graphviz==0.21"]
_MARKER = BENCH_DIR / "installed.json"


def installed() -> bool:
    """Whether :func:`setup` has installed exactly the pinned versions."""
    try:
        return json.loads(_MARKER.read_text()) == {"original": ORIGINAL, "site": SITE}
    except (OSError, ValueError):
        return False


def setup(quiet: bool = True) -> None:
    """Install the competitors into ``.bench/`` (needs the package index once; a no-op afterwards)."""
    if installed():
        return
    for target, packages in ((ORIGINAL_DIR, ORIGINAL), (SITE_DIR, SITE)):
        command = [sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade", "--target", str(target)]
        command += (["-q"] if quiet else []) + packages
        print("setting up competitors:", " ".join(packages), "->", target.relative_to(ROOT), flush=True)
        subprocess.run(command, check=True)
    _MARKER.write_text(json.dumps({"original": ORIGINAL, "site": SITE}))


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
