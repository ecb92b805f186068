"""benchmarks/gpu_check.py (``make gpu-check``): its dry run, ``DEVICE=cpu QUICK=1``, works end to end.

The script is written for a GPU lent for minutes, where a crash costs the loan: the suite runs it
on CPU with its small sizes (as ``make gpu-check DEVICE=cpu QUICK=1`` does) and checks what it
writes: every step recorded, every workload's six rows either timed (a finite positive rate, a
meta-gradient that matches the hand-written per-task loop's) or skipped with the reason, the demo
run, the tests step's outcome. Two things are made smaller than the make target's dry run, for
time: the tests step collects one module (``tests/test_imports.py``, which has no device test:
"none found", as on any CPU machine) instead of the whole suite, and JAX is left out
(``--no-jax``: its CPU compile of the conv workload takes most of a minute); JAX's rows are run by
their own test on the sine workload alone, where JAX is installed. No timing is asserted.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from torch_versions import needs_compile

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _dry_run(out: Path, *args: str) -> tuple[dict, str]:
    """The script on CPU with --quick, in a subprocess (it sets process-wide torch state); its JSON and markdown."""
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out), *args]
    env = {key: value for key, value in os.environ.items() if key != "OUT"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    md = out / "gpu-check.md"
    steps = md.read_text().partition("## Steps")[2].partition("\n## ")[0] if md.exists() else ""
    assert result.returncode == 0, (steps or result.stdout[-3000:]) + result.stderr[-3000:]
    return json.loads((out / "gpu-check.json").read_text()), md.read_text()


def _check_timed_row(where: str, row: dict) -> None:
    assert row["status"] == "timed", (where, row)
    assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0, (where, row)
    assert math.isfinite(row["per_second"]) and row["per_second"] > 0, (where, row)
    assert row["rounds"] >= 1, (where, row)
    # to float32 precision, or (a max-pool/ReLU switch under float32 rounding) in float64
    assert row["grad_ok"] is True and row["grad_nonfinite"] == 0, (where, row)
    assert row["grad_error"] <= gpu_check.CHECK_TOLERANCE or row["grad_error64"] <= gpu_check.CHECK_TOLERANCE_64


@needs_compile  # the compiled rows
def test_the_dry_run_records_every_step_workload_and_implementation(tmp_path):
    report, md = _dry_run(tmp_path, "--tests", "tests/test_imports.py", "--no-jax")
    steps = report["steps"]
    assert list(steps) == ["environment", "tests", "timings", "demo"]
    assert {name: step["status"] for name, step in steps.items()} == dict.fromkeys(steps, "ok"), steps
    assert report["device"] == "cpu" and report["quick"] is True

    environment = steps["environment"]
    assert environment["torch"] and environment["python"] and environment["cuda_available"] in (True, False)

    tests = steps["tests"]
    assert tests["exit_status"] == 5 and "none found" in tests["note"]  # pytest: no test collected
    assert tests["counts"]["tests"] == 0 and "-k cuda" in tests["command"]

    timings = steps["timings"]
    assert [result["workload"] for result in timings["workloads"]] == ["sine", "deep", "conv"]
    for result in timings["workloads"]:
        rows = result["rows"]
        assert list(rows) == [entry.name for entry in gpu_check.ENTRIES]
        for name, row in rows.items():
            where = f"{result['workload']}/{name}"
            if name == "jax":
                assert row["status"] == "skipped" and row["reason"] == "--no-jax", (where, row)
            else:
                _check_timed_row(where, row)
                assert row["peak_mib"] is None  # n/a off CUDA
        assert rows["ours"]["ratio"] > 0 and rows["ours_batched"]["ratio"] > 0
        assert "ratio" not in rows["ours_compiled"]  # its reference, JAX, was left out
        for entry in gpu_check.ENTRIES:
            assert f"| {result['workload']} | {entry.label} |" in md

    demo = steps["demo"]
    assert demo["iterations"] == demo["requested_iterations"] == 20 and "reduced" not in demo
    assert demo["timings"]["per_iteration_ms"] > 0 and "MAML" in demo["table"]
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert "MSE on 20 test tasks" in demo["table_text"]

    assert md.startswith("# gpu-check: ")
    for heading in ("## Steps", "## Environment", "## Device tests", "## Meta-iterations on cpu", "## Demo"):
        assert heading in md, heading
    assert "MSE on 20 test tasks" in md


@pytest.mark.skipif(gpu_check.jax_source() is None, reason="JAX is installed by benchmarks/run.py --setup")
def test_the_jax_rows_are_checked_and_timed_where_jax_is_importable(tmp_path):
    report, md = _dry_run(tmp_path, "--workloads", "sine", "--skip", "tests,demo")
    assert report["steps"]["environment"]["jax"]["backend"] == "cpu"
    (result,) = report["steps"]["timings"]["workloads"]
    _check_timed_row("sine/jax", result["rows"]["jax"])
    assert result["rows"]["ours_compiled"]["ratio"] > 0
    assert "| sine | JAX jit + vmap |" in md


def test_the_demo_iterations_fit_the_time_left():
    probe = {"options": {"iterations": 200}, "timings": {"per_iteration_ms": 4.0, "baseline_s": 0.2}}
    # 5 ms an iteration (4 ms meta-step + 1 ms baseline step), 10 s fixed (200 iterations took 11 s)
    assert gpu_check.fit_demo_iterations(70_000, 1000.0, probe, 11.0) == 70_000
    assert gpu_check.fit_demo_iterations(70_000, 300.0, probe, 11.0) == int((0.9 * 300 - 10) / 0.005)
    assert gpu_check.fit_demo_iterations(70_000, 10.5, probe, 11.0) == 0  # not even the probe's 200


def test_the_tests_summary_names_failures_and_tells_collection_errors_apart(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
        <testcase classname="tests.test_a" name="test_ok[cuda]" />
        <testcase classname="tests.test_a" name="test_bad[cuda]"><failure message="assert 0">...</failure></testcase>
        <testcase classname="tests.test_a" name="test_setup[cuda]"><error message="failed on setup">...</error></testcase>
        <testcase classname="tests.test_a" name="test_skip[cuda]"><skipped message="no" /></testcase>
        <testcase classname="" name="tests.differential.test_b"><error message="collection failure">...</error></testcase>
        </testsuite></testsuites>"""
    )
    summary = gpu_check.summarize_junit(junit)
    assert summary["counts"] == {
        "tests": 4,
        "passed": 1,
        "failed": 1,
        "errors": 1,
        "skipped": 1,
        "collection_errors": 1,
    }
    assert summary["failed"] == ["tests.test_a.test_bad[cuda]"]
    assert summary["errors"] == ["tests.test_a.test_setup[cuda]"]
    assert summary["collection_errors"] == ["tests.differential.test_b"]
