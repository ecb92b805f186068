"""benchmarks/compiled.py runs end to end on a tiny setting (no timing is asserted).

Without JAX (an optional competitor, installed by ``benchmarks/run.py --setup`` from the package
index), but with its meta-gradient check: a compiled torch.func meta-iteration computes the
torch reference's meta-gradient, and a compiled meta-iteration written with our API either
computes it too or is reported as failing to compile, never as a wrong result nor a crash; a
compile past ``--compile-timeout`` is reported as such. Every run here uses the ``aot_eager``
backend: dynamo and AOTAutograd trace the variants exactly as for inductor, without generating C++
kernels (seconds, not the minutes inductor's cold compiles take); the script's code is the same for
every backend, and our compiled API under inductor is tested end to end by tests/test_compiled.py and
the differential harness (tests/differential). Where JAX is installed, its workloads' meta-gradients
are checked against the torch reference in float64, the conv layers (convolution, batch-statistics
BatchNorm, max-pool, cross-entropy) on a small net."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_versions import needs_compile

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import competitors  # noqa: E402
from benchmarks.implementations import build_vmap, safe_sqrt  # noqa: E402
from benchmarks.jax_workloads import JaxRunner, export  # noqa: E402
from benchmarks.workloads import Workload, conv_net  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "compiled.py"
TINY = [
    *("--tiny", "--workloads", "sine", "--rounds", "1", "--warmup", "0", "--quiet", "--no-cache-times"),
    *("--backend", "aot_eager"),
]


def _run(tmp_path: Path, *args: str) -> dict:
    """compiled.py on the tiny setting, with a private, empty compile cache."""
    out = tmp_path / "compiled.json"
    command = [sys.executable, str(SCRIPT), *TINY, *args, "--json", str(out)]
    cache = tmp_path / "inductor"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "HIGHER_BENCH_CACHE_DIR": str(cache)}
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
    args = ["--optimizers", "sgd", "--variants", "tfunc_compiled,tfunc_eager", "--no-jax"]
    results = _run(tmp_path, *args)
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


def test_a_compile_past_the_time_limit_is_reported_not_hidden(tmp_path):
    results = _run(
        tmp_path,
        "--optimizers",
        "sgd",
        "--variants",
        "tfunc_compiled,tfunc_eager",
        "--no-jax",
        "--no-memory",
        "--compile-timeout",
        "0.5",
    )
    (record,) = results["results"]
    assert record["failed"]["tfunc_compiled"].startswith("not compiled: first call stopped after ")
    assert "tfunc_compiled" not in record["median_ms"] and record["median_ms"]["tfunc_eager"] > 0


@needs_compile
def test_conv_through_our_compiled_api_traces_to_the_reference_meta_gradient(tmp_path):
    """The conv workload (BatchNorm with batch statistics, max-pool) compiled whole through our API."""
    results = _run(
        tmp_path,
        "--workloads",
        "conv",
        "--optimizers",
        "sgd",
        "--variants",
        "ours_compiled_whole,ours_batched",
        "--no-jax",
        "--no-memory",
    )
    (record,) = results["results"]
    assert results["settings"]["backend"] == "aot_eager"
    assert not record["failed"], record["failed"]
    for name in ("ours_compiled_whole", "ours_batched"):
        assert record["check"][name]["float32_error"] < 1e-5 and record["median_ms"][name] > 0


def _small_conv_task_data():
    """A small conv net (4 channels, 16x16 images: 16-8-4-2-1), 2 tasks of 3 ways, float64."""
    torch.manual_seed(0)
    model = conv_net(ways=3, channels=4)
    generator = torch.Generator().manual_seed(1)
    support_x = torch.randn(2, 3, 1, 16, 16, generator=generator)
    query_x = torch.randn(2, 6, 1, 16, 16, generator=generator)
    support_y = torch.arange(3).expand(2, -1).contiguous()
    query_y = torch.arange(3).repeat(2).expand(2, -1).contiguous()
    return model, (support_x, support_y, query_x, query_y)


def test_export_refuses_layers_the_jax_side_does_not_implement(tmp_path):
    _, data = _small_conv_task_data()
    kwargs = {"workload": "conv", "optimizer": "sgd", "lr": 0.1, "steps": 1, "loss": "cross_entropy"}
    for model, words in (
        (nn.Sequential(nn.Conv2d(1, 2, 3, stride=2)), "stride 1"),
        (nn.Sequential(nn.BatchNorm2d(2)), "track_running_stats=False"),
        (nn.Sequential(nn.MaxPool2d(2, ceil_mode=True)), "floor mode"),
        (nn.Sequential(nn.GELU()), "not GELU"),
    ):
        with pytest.raises(ValueError, match=words):
            export(model, data, tmp_path / "x.npz", **kwargs)
    with pytest.raises(ValueError, match="cross_entropy"):
        export(nn.Sequential(nn.ReLU()), data, tmp_path / "x.npz", **{**kwargs, "loss": "nll"})


@pytest.mark.skipif(not competitors.jax_installed(), reason="JAX is installed by benchmarks/run.py --setup")
@pytest.mark.parametrize(("optimizer", "tasks"), [("sgd", "map"), ("adam", "vmap")])
def test_jax_conv_meta_gradient_matches_the_torch_reference(tmp_path, optimizer, tasks):
    """JAX's conv, batch-statistics BatchNorm, max-pool and cross-entropy against the hand-written
    torch vmap reference (second order, 2 inner steps), both in float64, on the same weights and data."""
    model, data = _small_conv_task_data()
    lr = {"sgd": 0.1, "adam": 0.01}
    workload = Workload("small conv", "", lambda: model, lambda g: data, F.cross_entropy, 2, 2, lr)
    npz = tmp_path / "conv.npz"
    settings = {"optimizer": optimizer, "lr": lr[optimizer], "steps": 2, "loss": "cross_entropy", "tasks": tasks}
    export(model, data, npz, workload="conv", **settings)
    runner = JaxRunner(npz)
    runner.close()
    reference = copy.deepcopy(model)
    with safe_sqrt():
        build_vmap(workload, reference, data, optimizer)()
    expected = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
    got = torch.tensor(runner.grads, dtype=torch.float64)
    assert got.shape == expected.shape
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-9


def test_a_variant_whose_meta_gradient_is_all_nan_is_not_timed_as_checked(tmp_path, monkeypatch):
    """An all-NaN meta-gradient leaves nothing to compare: the variant is reported as unchecked
    (it once passed the check silently and was timed, torch.func with Adam on conv)."""
    from benchmarks import compiled

    def build_nan(workload, model, data, optimizer, settings):
        def meta_iteration():
            for p in model.parameters():
                p.grad = torch.full_like(p, float("nan"))

        return meta_iteration

    monkeypatch.setitem(compiled.VARIANTS, "nan", compiled.Variant("nan", "all NaN", build_nan))
    out = tmp_path / "compiled.json"
    args = [*TINY, "--optimizers", "sgd", "--variants", "nan,tfunc_eager", "--no-jax", "--no-memory"]
    assert compiled.main([*args, "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())["results"]
    assert record["failed"]["nan"].startswith("not checked: all "), record["failed"]
    assert "nan" not in record["median_ms"] and record["median_ms"]["tfunc_eager"] > 0
