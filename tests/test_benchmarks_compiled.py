"""benchmarks/compiled.py runs end to end on a tiny setting (no timing is asserted).

Without JAX (an optional competitor, installed by ``benchmarks/run.py --setup`` from the package
index), but with its meta-gradient check: a compiled torch.func meta-iteration computes the
torch reference's meta-gradient, and a compiled meta-iteration written with our API either
computes it too or is reported as failing to compile, never as a wrong result nor a crash.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import competitors  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "compiled.py"
TINY = ["--tiny", "--workloads", "sine", "--rounds", "1", "--warmup", "0", "--quiet", "--no-cache-times"]


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "compiled.json"
    command = [sys.executable, str(SCRIPT), *TINY, *args, "--json", str(out)]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| workload | optimizer | variant | median ms |" in result.stdout
    return json.loads(out.read_text())


def test_compiled_benchmark_checks_and_times_without_jax(tmp_path):
    variants = "jax,tfunc_compiled,ours_compiled_batched,ours_batched"
    results = _run(tmp_path, "--optimizers", "sgd", "--variants", variants, "--no-jax", "--no-memory")
    (record,) = results["results"]
    assert "jax" not in record["names"] and results["skipped"] == ["JAX: --no-jax"]
    # The compiled torch.func meta-iteration is timed, its first call (the compile) reported apart.
    assert record["median_ms"]["tfunc_compiled"] > 0 and record["compile_s"]["tfunc_compiled"] > 0
    assert record["check"]["tfunc_compiled"]["float32_error"] < 1e-5
    assert record["check"]["ours_batched"]["float32_error"] < 1e-5
    # Ours compiled: timed with the right meta-gradient, or reported as not compiling; never wrong.
    ours = "ours_compiled_batched"
    if ours in record["failed"]:
        assert record["failed"][ours].startswith("failed: "), record["failed"][ours]
    else:
        assert record["check"][ours]["float32_error"] < 1e-5 and record["median_ms"][ours] > 0


def test_memory_is_measured_after_the_compile(tmp_path):
    results = _run(tmp_path, "--optimizers", "sgd", "--variants", "tfunc_compiled,tfunc_eager", "--no-jax")
    (record,) = results["results"]
    for name in ("tfunc_compiled", "tfunc_eager"):
        memory = record["memory"][name]
        assert 0 < memory["before"] <= memory["peak"] and memory["before"] <= memory["process_peak"]


@pytest.mark.skipif(not competitors.jax_installed(), reason="JAX is installed by benchmarks/run.py --setup")
def test_jax_meta_gradient_matches_the_torch_reference(tmp_path):
    results = _run(tmp_path, "--optimizers", "sgd,adam", "--variants", "jax,tfunc_eager", "--no-memory")
    for record in results["results"]:
        assert not record["failed"], record["failed"]
        assert record["check"]["jax"]["float64_error"] < 1e-8
        assert record["median_ms"]["jax"] > 0
