"""The benchmark runs end to end on a tiny setting (no timing is asserted: see benchmarks/).

Without the competitors (they are installed by the benchmark's own setup, from the package
index), but with its meta-gradient check: every implementation of ours and the hand-written
ones compute the same meta-gradient in float64.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import run  # noqa: E402
from benchmarks.implementations import IMPLEMENTATIONS  # noqa: E402
from benchmarks.workloads import WORKLOADS, tiny  # noqa: E402


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("workload", ["sine", "conv"])
def test_every_implementation_computes_the_same_meta_gradient(workload, optimizer):
    impls = [impl for impl in IMPLEMENTATIONS.values() if not impl.competitor]
    notes = run.check_meta_gradients(tiny(WORKLOADS[workload]), optimizer, impls)
    ours = [note for note in notes if "ours" in note]
    assert not ours, ours


def test_the_benchmark_command_writes_its_table(tmp_path, capsys):
    args = ["--tiny", "--no-competitors", "--no-memory", "--rounds", "1", "--warmup", "0", "--quiet"]
    assert run.main([*args, "--workloads", "deep", "--optimizers", "sgd", "--output", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    for impl in IMPLEMENTATIONS.values():
        assert (impl.label in table) != impl.competitor
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert results[0]["workload"] == "deep" and results[0]["median_ms"]["ours"] > 0
    assert "| deep | sgd | ours (innerloop_ctx) | per task |" in capsys.readouterr().out


def test_peak_memory_is_measured_in_a_fresh_process():
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--memory-child", "sine:sgd:ours:tiny"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0 < memory["before"] <= memory["peak"]


def test_one_step_breakdown_checks_and_reports_every_variant(capsys):
    from benchmarks import one_step

    assert one_step.main(["--rounds", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["check"]) == set(one_step.VARIANTS)
    assert all(difference <= 1e-10 for difference in report["check"].values())
    for variant in one_step.VARIANTS:
        timings = report["us"][variant]
        assert timings["task"] > 0 and set(timings) == {"task", *one_step.PHASES}
    assert report["us"]["ours"]["open"] > 0  # ours opens an inner loop, the hand-written loop does not


def test_one_step_breakdown_refuses_to_time_a_wrong_meta_gradient(monkeypatch, capsys):
    from benchmarks import one_step

    right = one_step.meta_gradient

    def off_for_ours(variant, workload, dtype):
        grads = right(variant, workload, dtype)
        return [g * 1.001 for g in grads] if variant == "ours" else grads

    monkeypatch.setattr(one_step, "meta_gradient", off_for_ours)
    assert one_step.main(["--rounds", "1", "--quiet"]) == 1
    assert "differ" in capsys.readouterr().err
