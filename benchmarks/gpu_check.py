"""`make gpu-check`: everything worth knowing from one lent GPU, in one command of at most 10 minutes.

    python3 benchmarks/gpu_check.py                          # on the GPU machine (make gpu-check)
    python benchmarks/gpu_check.py --device cpu --quick      # the dry run (make gpu-check DEVICE=cpu QUICK=1)

A GPU is lent for 15 minutes of device time at most, its start included, and runs one command of
at most 10 minutes from a fresh copy of the working tree, with nothing installable and no
network. So this script needs nothing but what the GPU image has (torch, numpy; JAX, matplotlib
and tqdm where present), imports the package from ``src/`` (no ``pip install``: with build
isolation pip would fetch setuptools, which it cannot offline), and gets as much as it can out of
one run: every step is timed, a failing step is recorded and the next one runs, and a global time
budget (``--budget``, default 540 s) ends the run in time: a step that would not fit is skipped
with the reason, and the demo, last, runs as many iterations as the time left allows. The steps:

1. ``environment``: Python, torch (its CUDA and cuDNN), the GPU's name, capability and memory,
   JAX (its version and devices, asked in a child process: JAX never shares a process with torch
   here), numpy, matplotlib, tqdm, pytest, the commit.
2. ``tests``: the device-parametrized tests, ``python -m pytest -q -k cuda -p no:cacheprovider tests``
   (``--tests`` replaces ``tests``), with a time cap (``--tests-timeout``); their counts and the
   names of the failures, from a JUnit XML file written into the output folder. No test collected
   (pytest's exit status 5, as on a CPU machine) is "none found", not a failure; pytest missing is
   recorded as a skip.
3. ``timings``: for the ``sine``, ``deep`` and ``conv`` workloads (conv: 32 tasks, 5-way 1-shot,
   28x28 inputs, the 4-conv network of the MAML paper with 64 filters), one process builds six
   meta-iterations on copies of the same model and data on the device, side by side: ours per
   task (``innerloop_ctx``) against the hand-written per-task loop, ours task-batched
   (``tasks=T``) against the hand-written ``vmap``, and ours task-batched inside ``torch.compile``
   (default inductor backend) against ``jax.jit`` + ``jax.vmap`` (a child process on the same
   device, handed the same weights and data). Each meta-gradient is checked against the
   hand-written per-task loop's (largest difference relative to its largest entry; a wrong but fast
   row shows as such), then all are timed in interleaved rounds (a new random order each round,
   ``torch.cuda.synchronize`` around each call) and reported as the median milliseconds,
   meta-iterations per second and the time ratio to the reference column, beside the goals
   (per task at most 0.9x the loop, task-batched at most 1.0x vmap, compiled at most 1.0x JAX);
   then the peak GPU memory of one meta-iteration above what was allocated before it
   (``torch.cuda.max_memory_allocated``, reset per implementation; JAX: its allocator's peak above
   what it holds at rest; "n/a" on CPU). Everything is float32 without TF32 on both sides (TF32 is
   torch's default for convolutions and JAX's for every float32 matmul on a GPU): the same
   arithmetic, and a meta-gradient check to float32 precision.
4. ``demo``: ``python -m higher demo --device cuda --json --no-progress`` (70,000 iterations, the
   paper's), its table and times, the PNG into the output folder. A 200-iteration probe first
   measures its pace; if the whole run would not fit in the time left, it runs as many iterations
   as fit, and says so. Without matplotlib, the demo runs with its plot left out (this script
   starts it with the plotting function replaced by one that draws nothing).

It writes ``gpu-check.json`` and ``gpu-check.md`` (markdown tables, with the GPU's name and the
date) after every step into ``$OUT`` when that is set, else ``--out`` (default ``.gpu-check/``),
with ``pytest-cuda.xml`` and ``demo.png``. Its exit status is 1 if a step failed, else 0.

``--quick`` shrinks every size (2 tasks, 2 inner steps, narrow networks, 1 warm-up and 3 timed
rounds, a 20-iteration demo on 20 test tasks), and on CPU compiles with the ``eager`` backend (dynamo
captures the whole meta-iteration, ``fullgraph=True``, as for inductor, and runs the captured graph
eagerly: seconds instead of the minutes of inductor's C++ compiles): with ``--device cpu`` it is
the dry run that the test suite runs (``tests/test_benchmarks_gpu_check.py``), so the script is
known to work before a GPU is lent. JAX runs where it is importable (the environment's ``jax``,
else ``.bench/jax`` from ``benchmarks/run.py --setup``); where it is not, its rows say so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

START = time.monotonic()  # the budget counts from here, the imports of torch included
ROOT = Path(__file__).resolve().parents[1]
for _path in (str(ROOT / "src"), str(ROOT)):  # this checkout's higher and benchmarks, not an installed one
    if _path not in sys.path:
        sys.path.insert(0, _path)

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from benchmarks.workloads import Workload

#: The demo's full length (the MAML paper's) and the probe that measures its pace first.
DEMO_ITERATIONS = 70_000
PROBE_ITERATIONS = 200
#: The time the demo is kept: the timings stop in time to leave it this much.
DEMO_RESERVE_S = 120.0
#: The most the timings take in all (their unused time goes to the demo).
TIMINGS_CAP_S = 300.0
#: Relative difference (to the reference's largest entry) under which a float32 meta-gradient agrees,
#: and a float64 one (the recheck of a float32 meta-gradient that misses: see :func:`measure_workload`).
CHECK_TOLERANCE = 1e-3
CHECK_TOLERANCE_64 = 1e-8
#: The filters of the conv workload's network: the MAML paper's Omniglot network has 64.
CONV_CHANNELS = 64
#: This module's test, which runs this script: the tests step never collects it (no recursion).
OWN_TEST = ROOT / "tests" / "test_benchmarks_gpu_check.py"


# ------------------------------------------------------------------ the record and its files
class Budget:
    """The global time budget: seconds since the start and seconds left until the deadline."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = START + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - START


def _now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _short(error: BaseException, limit: int = 300) -> str:
    """The error's type and first line, markdown-safe, at most ``limit`` characters."""
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0] if str(error) else type(error).__name__
    text = text.replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _one_line(text: str, limit: int = 600) -> str:
    """``text`` for a markdown table cell: one line, no ``|``, at most ``limit`` characters."""
    text = " / ".join(line.strip() for line in str(text).splitlines() if line.strip()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_outputs(report: dict, out: Path) -> None:
    """``gpu-check.json`` and ``gpu-check.md`` into ``out``: written after every step, so a run
    stopped from outside still leaves what it measured."""
    report["elapsed_s"] = round(time.monotonic() - START, 1)
    _write_atomically(out / "gpu-check.json", json.dumps(report, indent=1, default=str) + "\n")
    _write_atomically(out / "gpu-check.md", markdown(report))


def run_step(
    name: str,
    report: dict,
    out: Path,
    budget: Budget,
    needs_s: float,
    body: Callable[[dict], str | None],
    skip: tuple[str, ...] | set[str] = (),
) -> dict:
    """Run one step, recording its status, seconds and outcome; never raises (but on Ctrl-C).

    ``body(record)`` fills ``record`` and returns ``None`` (ok) or the reason it did nothing
    (``"skipped"``); an exception marks the step ``"failed"`` with its message and traceback. A step
    named in ``skip`` (``--skip``), or that needs more than the ``needs_s`` seconds left, is skipped
    without starting.
    """
    record: dict[str, Any] = {"status": "running"}
    report["steps"][name] = record
    left = budget.left()
    if name in skip or left < needs_s:
        reason = f"--skip {name}" if name in skip else f"time budget: {left:.0f} s left, needs about {needs_s:.0f} s"
        record.update(status="skipped", seconds=0.0, reason=reason)
        write_outputs(report, out)
        return record
    print(f"[gpu-check] {name} ({budget.elapsed():.0f} s in, {left:.0f} s left)", flush=True)
    start = time.monotonic()
    try:
        skipped = body(record)
        if record["status"] == "running":
            record["status"] = "skipped" if skipped else "ok"
        if skipped:
            record["reason"] = skipped
    except BaseException as error:  # KeyboardInterrupt included: the files are still written
        record.update(status="failed", error=_short(error), traceback=traceback.format_exc()[-4000:])
        if isinstance(error, KeyboardInterrupt):
            record["seconds"] = round(time.monotonic() - start, 1)
            write_outputs(report, out)
            raise
    record["seconds"] = round(time.monotonic() - start, 1)
    print(f"[gpu-check] {name}: {record['status']} in {record['seconds']:.0f} s", flush=True)
    write_outputs(report, out)
    return record


def _run_command(command: list[str], timeout: float, log: Path, interrupt_first: bool = False) -> tuple[int, bool, str]:
    """Run ``command`` (from the repository root) with its output into ``log``; returns its exit status,
    whether it ran past ``timeout`` seconds, and its output. Past the timeout it gets SIGINT first if
    ``interrupt_first`` (pytest then writes its summary and its XML file), then is killed."""
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, text=True)
        timed_out = False
        try:
            process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            if interrupt_first:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
            if process.poll() is None:
                process.kill()
                process.wait()
    return process.returncode, timed_out, log.read_text(errors="replace")


# ------------------------------------------------------------------ step 1: the environment
def _version(module: str) -> str | None:
    """A module's version without importing it where its metadata says it (None: not importable)."""
    if importlib.util.find_spec(module) is None:
        return None
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return "present (version unknown)"


def jax_source() -> str | None:
    """Where the JAX child processes take JAX from: ``"environment"`` (this interpreter's ``jax``, as
    on the GPU image), ``"bench"`` (``.bench/jax``), or ``None`` (nowhere)."""
    from benchmarks import competitors

    if importlib.util.find_spec("jax") is not None:
        return "environment"
    return "bench" if competitors.jax_installed() else None


def jax_environment(device: torch.device) -> dict[str, str]:
    """The JAX child processes' environment: JAX from :func:`jax_source`, on ``device``'s platform; on
    CPU pinned to one core, as torch runs on one thread here."""
    from benchmarks import competitors

    on_cpu = device.type == "cpu"
    core = max(os.sched_getaffinity(0)) if on_cpu and hasattr(os, "sched_getaffinity") else None
    return competitors.jax_environment(core, platform="cpu" if on_cpu else device.type, bundled=jax_source() == "bench")


_JAX_PROBE = """
import json
from benchmarks import competitors
jax = competitors.load_jax()
devices = jax.devices()
try:
    import optax
    optax = optax.__version__
except ImportError:
    optax = None
print(json.dumps({"version": jax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in devices],
                  "device_kind": devices[0].device_kind, "optax": optax}))
"""


def step_environment(record: dict, device: torch.device, use_jax: bool) -> None:
    import torch

    import higher

    record["python"] = platform.python_version()
    record["platform"] = platform.platform()
    record["cpu_count"] = os.cpu_count()
    record["torch"] = torch.__version__
    record["torch_cuda"] = torch.version.cuda
    record["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    record["higher"] = higher.__version__
    record["higher_file"] = higher.__file__
    for module in ("numpy", "pytest", "matplotlib", "tqdm"):
        record[module] = _version(module)
    record["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        index = device.index if device.type == "cuda" and device.index is not None else 0
        properties = torch.cuda.get_device_properties(index)
        record["gpu"] = properties.name
        record["capability"] = "{}.{}".format(*torch.cuda.get_device_capability(index))
        record["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
        record["gpu_count"] = torch.cuda.device_count()
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_mode", "--format=csv,noheader"]
        try:
            record["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as error:
            record["nvidia_smi"] = _short(error)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        record["commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        record["commit"] = None
    source = jax_source()
    record["jax_source"] = source
    if not use_jax:
        record["jax"] = "not asked (--no-jax)"
    elif source is None:
        record["jax"] = None
    else:
        try:
            probe = subprocess.run(
                [sys.executable, "-c", _JAX_PROBE],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
                env=jax_environment(device),
            )
            if probe.returncode == 0:
                record["jax"] = json.loads(probe.stdout.strip().splitlines()[-1])
            else:
                record["jax"] = {"error": _one_line(_tail(probe.stderr, 3), 500)}
        except subprocess.TimeoutExpired:
            record["jax"] = {"error": "no answer within 120 s"}
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch.cuda.is_available() is False")


# ------------------------------------------------------------------ step 2: the device tests
def summarize_junit(path: Path) -> dict:
    """Counts and names from pytest's JUnit XML file: passed, failed, errors (collection errors apart),
    skipped, and the names of the failures and errors (``module.test[params]``)."""
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "collection_errors": 0}
    names: dict[str, list[str]] = {"failed": [], "errors": [], "collection_errors": []}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = ".".join(part for part in (case.get("classname"), case.get("name")) if part)
        outcomes = {child.tag: child for child in case}
        error = outcomes.get("error")
        if error is not None and error.get("message") == "collection failure":
            counts["collection_errors"] += 1
            names["collection_errors"].append(name)
            continue
        counts["tests"] += 1
        if "failure" in outcomes:
            counts["failed"] += 1
            names["failed"].append(name)
        elif error is not None:
            counts["errors"] += 1
            names["errors"].append(name)
        elif "skipped" in outcomes:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {"counts": counts, **names}


def step_tests(record: dict, args: argparse.Namespace, out: Path, budget: Budget) -> str | None:
    if importlib.util.find_spec("pytest") is None:
        return "pytest is not importable in this environment"
    junit = out / "pytest-cuda.xml"
    junit.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-q", "-k", args.keyword, "-p", "no:cacheprovider"]
    command += [
        "--continue-on-collection-errors",
        f"--junitxml={junit}",
        f"--ignore={OWN_TEST.relative_to(ROOT)}",
        *args.tests,
    ]
    timeout = max(min(args.tests_timeout, budget.left() - args.demo_reserve / 2), 10)
    record["command"] = "python " + " ".join(command[1:]).replace(str(out), "$OUT")
    record["timeout_s"] = round(timeout)
    status, timed_out, output = _run_command(command, timeout, out / "pytest-cuda.log", interrupt_first=True)
    record.update(exit_status=status, timed_out=timed_out, output_tail=_tail(output, 15))
    if junit.exists():
        record.update(summarize_junit(junit))
    counts = record.get("counts", {})
    notes = []
    if status == 5:  # pytest: no tests collected (a CPU machine: no test has cuda in its id)
        notes.append(f"no test matches -k {args.keyword}: none found")
    if counts.get("collection_errors"):  # a module needing what the image lacks (hypothesis, say): not a failure
        notes.append(f"{counts['collection_errors']} test modules could not be collected (see collection_errors)")
    if notes:
        record["note"] = "; ".join(notes)
    if timed_out:
        record["status"] = "failed"
        record["error"] = f"stopped after {timeout:.0f} s (--tests-timeout); counts are those run until then"
    elif counts.get("failed") or counts.get("errors"):
        record["status"] = "failed"
        record["error"] = f"{counts.get('failed', 0)} failed, {counts.get('errors', 0)} errors"
    elif status not in (0, 5) and not (status == 1 and counts.get("collection_errors")):
        record["status"] = "failed"
        record["error"] = f"pytest exit status {status}: {_one_line(_tail(output, 2), 300)}"
    return None


# ------------------------------------------------------------------ step 3: the timings
@dataclass(frozen=True)
class Entry:
    """One implementation timed: its row, the row it is compared with, and the goal for that ratio."""

    name: str
    label: str
    reference: str | None = None  # the row whose time it is divided by
    goal: float | None = None  # at most this ratio
    compiled: bool = False


ENTRIES = (
    Entry("loop", "hand-written loop (per task)"),
    Entry("ours", "ours per task (innerloop_ctx)", "loop", 0.9),
    Entry("vmap", "hand-written vmap (task-batched)"),
    Entry("ours_batched", "ours task-batched (tasks=T)", "vmap", 1.0),
    Entry("jax", "JAX jit + vmap", compiled=True),
    Entry("ours_compiled", "ours task-batched, torch.compile", "jax", 1.0, compiled=True),
)
LABELS = {entry.name: entry.label for entry in ENTRIES}


def workloads(quick: bool) -> dict[str, Workload]:
    """sine (25 tasks) and deep (8 tasks) as in ``benchmarks/workloads.py``, and the Omniglot-sized conv
    workload: 32 tasks, 5-way 1-shot (15 queries per class), 28x28, 64 filters. ``quick``: 2 tasks,
    2 inner steps, narrow networks (a 4-layer width-16 deep MLP; 8 filters and 1 query per class)."""
    import torch.nn.functional as F

    from benchmarks.workloads import WORKLOADS, Workload, _image_data, _sine_data, conv_net, deep_mlp, sine_mlp

    lr = {"sgd": 0.1, "adam": 0.001}
    if quick:
        return {
            "sine": Workload(
                "sine",
                "MLP 1-40-40-1 (ReLU), 2 tasks, 10+10 points, 2 steps (quick)",
                sine_mlp,
                lambda g: _sine_data(2, 10, 10, g),
                F.mse_loss,
                tasks=2,
                inner_steps=2,
            ),
            "deep": Workload(
                "deep",
                "4-layer tanh MLP, width 16, 2 tasks, 10+10 points, 2 steps (quick)",
                lambda: deep_mlp(4, 16),
                lambda g: _sine_data(2, 10, 10, g),
                F.mse_loss,
                tasks=2,
                inner_steps=2,
            ),
            "conv": Workload(
                "conv",
                "4x(conv3x3 8, BatchNorm (batch stats), ReLU, maxpool) on 1x28x28, 5-way 1-shot (1 query/class), "
                "2 tasks, 2 steps (quick)",
                lambda: conv_net(5, 8),
                lambda g: _image_data(2, 5, 1, 1, g),
                F.cross_entropy,
                tasks=2,
                inner_steps=2,
                lr=lr,
            ),
        }
    conv = Workload(
        "conv",
        f"4x(conv3x3 {CONV_CHANNELS}, BatchNorm (batch stats), ReLU, maxpool) on 1x28x28, 5-way 1-shot "
        "(15 queries/class), 32 tasks",
        lambda: conv_net(5, CONV_CHANNELS),
        lambda g: _image_data(32, 5, 1, 15, g),
        F.cross_entropy,
        tasks=32,
        lr=lr,
    )
    return {"sine": WORKLOADS["sine"], "deep": WORKLOADS["deep"], "conv": conv}


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _full_float32(device: torch.device) -> dict[str, bool] | None:
    """float32 matmuls and convolutions without TF32 (torch's default for cuDNN convolutions); returns the
    flags as torch reads them back.

    Through the ``allow_tf32`` flags: in torch 2.11 and 2.13 the newer ``fp32_precision`` setters leave
    the flags in a state that reading ``torch.backends.cudnn.allow_tf32`` afterwards refuses
    (``RuntimeError``: "a mix of the legacy and new APIs"), which other code may read.
    """
    import torch

    if device.type != "cuda":
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return {"matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32}


def _builder(name: str, backend: str) -> Callable:
    from benchmarks import compiled, implementations

    if name == "ours_compiled":
        settings = compiled.Settings(backend=backend)
        return lambda workload, model, data, optimizer: compiled.build_ours_compiled_batched(
            workload, model, data, optimizer, settings
        )
    return {
        "loop": implementations.build_loop,
        "ours": implementations.build_ours,
        "vmap": implementations.build_vmap,
        "ours_batched": implementations.build_ours_batched,
    }[name]


def _reference_gradient(workload: Workload, base: nn.Module, data: tuple, optimizer: str) -> Tensor:
    """The hand-written per-task loop's meta-gradient on the device (Adam: a sqrt of slope 0 at 0)."""
    from benchmarks.compiled import _flat_grad
    from benchmarks.implementations import build_loop, safe_sqrt

    model = copy.deepcopy(base)
    with safe_sqrt():
        build_loop(workload, model, data, optimizer)()
    return _flat_grad(model).detach().cpu()


def _peak_mib(device: torch.device, model: nn.Module, meta_iteration: Callable[[], None]) -> float | None:
    """GPU memory of one meta-iteration above what was allocated before it (None off CUDA)."""
    import torch

    if device.type != "cuda":
        return None
    for p in model.parameters():
        p.grad = None
    gc.collect()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    meta_iteration()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _float64(base: nn.Module, data: tuple) -> tuple[nn.Module, tuple]:
    import torch

    return copy.deepcopy(base).double(), tuple(t.double() if torch.is_floating_point(t) else t for t in data)


def measure_workload(
    workload: Workload, device: torch.device, args: argparse.Namespace, end: float, hard_end: float
) -> dict:
    """Build, check and time the six implementations of one workload until ``end`` (monotonic time).

    The meta-gradient check: each float32 meta-gradient against the float32 hand-written loop's
    (``CHECK_TOLERANCE``). One that misses is computed again in float64 (compiled again, for the
    compiled rows) and checked against the float64 loop's (``CHECK_TOLERANCE_64``): max-pooling and
    ReLU make the conv meta-gradient jump where two inputs nearly tie, so float32 rounding alone can
    move an entry by 1e-3 of the largest (seen on CPU: a relative change of 1e-6 in the weights moves
    the loop's own meta-gradient that much), while a wrong result stays wrong in float64.
    """
    import torch

    from benchmarks.compiled import CompileTimeout, _compare, _flat_grad, _time_limit, export_workload
    from benchmarks.jax_workloads import JaxRunner
    from benchmarks.run import _data, _model

    optimizer = args.optimizer
    base = _model(workload, torch.float32).to(device)
    data = tuple(t.to(device) for t in _data(workload, torch.float32))
    reference = _reference_gradient(workload, base, data, optimizer)
    references64: list[Tensor] = []  # computed on first need

    def float64_error(entry: Entry, limit: float) -> float:
        """The float64 meta-gradient's difference to the float64 loop's (see above)."""
        base64, data64 = _float64(base, data)
        if not references64:
            references64.append(_reference_gradient(workload, base64, data64, optimizer))
        if entry.name == "jax":
            npz = export_workload(workload, base64, data64, optimizer, folder / f"{workload.name}-float64.npz")
            checker = JaxRunner(npz, environment=jax_environment(device), timeout=limit)
            checker.close()
            got64 = torch.tensor(checker.grads, dtype=torch.float64)
        else:
            with _time_limit(limit):
                _builder(entry.name, args.backend)(workload, base64, data64, optimizer)()
                _sync(device)
            got64 = _flat_grad(base64).detach().cpu()
        return _compare(got64, references64[0])[0]

    result: dict[str, Any] = {
        "workload": workload.name,
        "description": workload.description,
        "tasks": workload.tasks,
        "inner_steps": workload.inner_steps,
        "optimizer": optimizer,
        "parameters": sum(p.numel() for p in base.parameters()),
        "rows": {},
    }
    rows: dict[str, dict] = result["rows"]
    timers: dict[str, Callable[[], float]] = {}
    memories: dict[str, Callable[[], float | None]] = {}
    runners: list[JaxRunner] = []
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        for entry in ENTRIES:
            row: dict[str, Any] = {"label": entry.label, "reference": entry.reference, "goal": entry.goal}
            rows[entry.name] = row
            left = end - time.monotonic()
            if left < 5:
                row.update(status="skipped", reason="time budget of this workload spent")
                continue
            start = time.monotonic()
            if entry.name == "jax":
                if args.no_jax:
                    row.update(status="skipped", reason="--no-jax")
                    continue
                if jax_source() is None:
                    row.update(status="skipped", reason="JAX is not importable here (nor in .bench/jax)")
                    continue
                try:
                    npz = export_workload(workload, base, data, optimizer, folder / f"{workload.name}.npz")
                    runner = JaxRunner(npz, environment=jax_environment(device), timeout=left)
                except Exception as error:  # JAX without its GPU, a compile past the budget: recorded
                    row.update(status="failed", reason=_short(error))
                    continue
                runners.append(runner)
                row["first_call_s"] = runner.compile_s
                got = torch.tensor(runner.grads, dtype=reference.dtype)
                timers["jax"] = runner.time_one
                memories["jax"] = lambda runner=runner: _jax_peak_mib(runner)
            else:
                model = copy.deepcopy(base)
                try:
                    meta_iteration = _builder(entry.name, args.backend)(workload, model, data, optimizer)
                    with _time_limit(left):
                        meta_iteration()
                        _sync(device)
                except CompileTimeout:
                    row.update(
                        status="failed", reason=f"first call stopped after {time.monotonic() - start:.0f} s: budget"
                    )
                    torch._dynamo.reset()
                    continue
                except Exception as error:
                    row.update(status="failed", reason=_short(error))
                    torch._dynamo.reset()
                    continue
                row["first_call_s"] = time.monotonic() - start
                got = _flat_grad(model).detach().cpu()
                timers[entry.name] = _timer(device, model, meta_iteration)
                memories[entry.name] = lambda model=model, meta_iteration=meta_iteration: _peak_mib(
                    device, model, meta_iteration
                )
            error, nonfinite = _compare(got, reference)
            row.update(grad_error=error, grad_nonfinite=nonfinite)
            row["grad_ok"] = bool(nonfinite == 0 and error <= CHECK_TOLERANCE)
            if not row["grad_ok"]:
                try:
                    row["grad_error64"] = float64_error(entry, max(end - time.monotonic(), 5))
                    row["grad_ok"] = row["grad_error64"] <= CHECK_TOLERANCE_64
                except BaseException as error:  # a recompile past the time: unchecked, said so
                    if not isinstance(error, (Exception, CompileTimeout)):
                        raise
                    row["grad_recheck_error"] = _short(error)
                    row["grad_ok"] = None  # unchecked, not known wrong
                    torch._dynamo.reset()
        _time_rounds(timers, rows, args, end, hard_end)
        for name, peak in memories.items():
            if rows[name].get("status") == "timed":
                try:
                    rows[name]["peak_mib"] = peak()
                except Exception as error:
                    rows[name]["peak_mib_error"] = _short(error)
    finally:
        for runner in runners:
            with contextlib.suppress(Exception):
                runner.close()
        shutil.rmtree(folder, ignore_errors=True)
    for row in rows.values():
        reference_row = rows.get(row["reference"] or "", {})
        if "median_ms" in row and "median_ms" in reference_row:
            row["ratio"] = row["median_ms"] / reference_row["median_ms"]
            checked = row.get("grad_ok") and reference_row.get("grad_ok")
            row["goal_met"] = bool(checked and row["ratio"] <= row["goal"])
    return result


def _jax_peak_mib(runner: Any) -> float | None:
    stats = runner.memory()
    if stats.get("peak_bytes") is None:
        return None
    return (stats["peak_bytes"] - (stats.get("bytes_in_use") or 0)) / 2**20


def _timer(device: torch.device, model: nn.Module, meta_iteration: Callable[[], None]) -> Callable[[], float]:
    def timed() -> float:
        for p in model.parameters():
            p.grad = None
        _sync(device)
        start = time.perf_counter()
        meta_iteration()
        _sync(device)
        return time.perf_counter() - start

    return timed


def _time_rounds(
    timers: dict[str, Callable[[], float]], rows: dict[str, dict], args: argparse.Namespace, end: float, hard_end: float
) -> None:
    """Interleaved rounds, a new random order each: ``args.warmup`` untimed, then up to ``args.rounds``
    timed, fewer (at least ``args.min_rounds``) past ``end``, none past ``hard_end``.

    Python's cyclic garbage collector is off meanwhile (as in ``timeit``): a collection costs about
    0.3 s once dynamo has traced (its objects are many), and would land in whichever call it
    interrupts; tensors are freed by reference counting all the same.
    """
    times: dict[str, list[float]] = {name: [] for name in timers}
    order = list(timers)
    shuffle = random.Random(0).shuffle
    failed: dict[str, str] = {}
    gc.collect()
    gc.disable()
    try:
        _rounds(timers, times, failed, order, shuffle, args, end, hard_end)
    finally:
        gc.enable()
    for name in timers:
        row = rows[name]
        if name in failed:
            row.update(status="failed", reason=f"while timing: {failed[name]}")
        elif times[name]:
            median = statistics.median(times[name])
            row.update(
                status="timed",
                median_ms=1000 * median,
                per_second=1 / median,
                rounds=len(times[name]),
                spread_ms=[1000 * min(times[name]), 1000 * max(times[name])],
            )
        else:
            row.update(status="skipped", reason="time budget spent before its timed rounds")


def _rounds(
    timers: dict[str, Callable[[], float]],
    times: dict[str, list[float]],
    failed: dict[str, str],
    order: list[str],
    shuffle: Callable[[list[str]], None],
    args: argparse.Namespace,
    end: float,
    hard_end: float,
) -> None:
    for r in range(args.warmup + args.rounds):
        timed_rounds = max(r - args.warmup, 0)
        now = time.monotonic()
        if now > hard_end or (now > end and timed_rounds >= args.min_rounds):
            break
        shuffle(order)
        for name in order:
            if name in failed:
                continue
            try:
                elapsed = timers[name]()
            except Exception as error:  # e.g. out of memory: the others go on
                failed[name] = _short(error)
                continue
            if r >= args.warmup:
                times[name].append(elapsed)


def step_timings(record: dict, args: argparse.Namespace, device: torch.device, budget: Budget) -> None:
    import torch

    record["tf32"] = _full_float32(device)
    chosen = workloads(args.quick)
    names = [name.strip() for name in args.workloads.split(",") if name.strip()]
    unknown = [name for name in names if name not in chosen]
    if unknown:
        raise ValueError(f"unknown workloads {unknown}; choose from {', '.join(chosen)}")
    end_all = min(time.monotonic() + args.timings_cap, budget.deadline - args.demo_reserve)
    hard_end = budget.deadline - args.demo_reserve / 2
    record.update(
        device=str(device),
        optimizer=args.optimizer,
        backend=args.backend,
        warmup=args.warmup,
        rounds=args.rounds,
        precision="float32, TF32 off (torch and JAX)"
        if device.type == "cuda"
        else "float32, torch on one thread, JAX pinned to one core",
        jax_source="--no-jax" if args.no_jax else jax_source(),
        workloads=[],
    )
    problems = []
    for i, name in enumerate(names):
        now = time.monotonic()
        end = now + (end_all - now) / (len(names) - i)  # what earlier workloads left, shared out
        print(f"[gpu-check] timings: {name} until +{end - START:.0f} s", flush=True)
        try:
            result = measure_workload(chosen[name], device, args, end, hard_end)
        except Exception as error:  # the next workload still runs
            result = {"workload": name, "error": _short(error), "traceback": traceback.format_exc()[-3000:]}
            problems.append(f"{name}: {_short(error)}")
        record["workloads"].append(result)
        for row_name, row in result.get("rows", {}).items():
            if row.get("status") == "failed":
                problems.append(f"{name}/{row_name}: {row.get('reason')}")
            elif row.get("grad_ok") is False:
                problems.append(
                    f"{name}/{row_name}: meta-gradient differs by {row.get('grad_error', float('nan')):.2g}"
                )
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if problems:
        record["status"] = "failed"
        record["error"] = "; ".join(problems)[:1000]


# ------------------------------------------------------------------ step 4: the demo
def fit_demo_iterations(requested: int, seconds_left: float, probe: dict, probe_wall_s: float) -> int:
    """How many of ``requested`` demo iterations fit in ``seconds_left``, from a probe run's record.

    The probe ran ``probe["options"]["iterations"]`` iterations in ``probe_wall_s`` seconds (the
    process, its imports and evaluation included); each iteration costs a meta-iteration
    (``timings.per_iteration_ms``) and a step of the pretrained baseline (``timings.baseline_s`` per
    iteration); the rest is fixed. 10% is kept in reserve. Returns 0 if not even the probe's
    count fits."""
    iterations = probe["options"]["iterations"]
    timings = probe["timings"]
    per_iteration = timings["per_iteration_ms"] / 1000 + timings["baseline_s"] / iterations
    fixed = max(probe_wall_s - iterations * per_iteration, 0.0)
    fit = int((0.9 * seconds_left - fixed) / per_iteration) if per_iteration > 0 else requested
    return min(requested, fit) if fit >= iterations else 0


def _demo_command(args: argparse.Namespace, device: torch.device, iterations: int, png: Path) -> list[str]:
    demo = ["demo", "--device", str(device), "--json", "--no-progress", "--iterations", str(iterations)]
    demo += ["--out", str(png)] + (["--test-tasks", "20"] if args.quick else [])
    if importlib.util.find_spec("matplotlib") is None or args.demo_no_plot:
        return [sys.executable, str(Path(__file__).resolve()), "--demo-without-plot", *demo]
    return [sys.executable, "-m", "higher", *demo]


def _run_demo(args: argparse.Namespace, device: torch.device, iterations: int, png: Path, timeout: float, log: Path):
    """Returns the demo's JSON record (None if it printed none), its output, its wall seconds, and an error."""
    start = time.monotonic()
    status, timed_out, output = _run_command(_demo_command(args, device, iterations, png), timeout, log)
    wall = time.monotonic() - start
    record = None
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                record = json.loads(line)
            break
    error = None
    if timed_out:
        error = f"stopped after {timeout:.0f} s (time budget)"
    elif status != 0 or record is None:
        error = f"exit status {status}: {_tail(output, 1)}"
    return record, output, wall, error


def step_demo(record: dict, args: argparse.Namespace, device: torch.device, out: Path, budget: Budget) -> str | None:
    requested = args.demo_iterations
    png = out / "demo.png"
    record.update(requested_iterations=requested, device=str(device))
    if importlib.util.find_spec("matplotlib") is None or args.demo_no_plot:
        why = "--demo-no-plot" if args.demo_no_plot else "matplotlib is not importable"
        record["note"] = f"{why}: the demo ran with its plot left out (no demo.png)"
    iterations = requested
    if requested > PROBE_ITERATIONS and not args.quick:
        probe, output, wall, error = _run_demo(
            args, device, PROBE_ITERATIONS, out / "demo-probe.png", budget.left() - 10, out / "demo-probe.log"
        )
        if error is not None:
            record.update(
                status="failed", error=f"probe ({PROBE_ITERATIONS} iterations): {error}", output_tail=_tail(output)
            )
            return None
        assert probe is not None
        record["probe"] = {"iterations": PROBE_ITERATIONS, "wall_s": wall, "timings": probe.get("timings")}
        (out / "demo-probe.png").unlink(missing_ok=True)
        iterations = fit_demo_iterations(requested, budget.left() - 10, probe, wall)
        if iterations == 0:
            record.update(
                iterations=PROBE_ITERATIONS, wall_s=wall, table=probe.get("table"), timings=probe.get("timings")
            )
            record["reduced"] = f"only the {PROBE_ITERATIONS}-iteration probe fitted in the time budget"
            record["table_text"] = _demo_table_text(output)
            return None
        if iterations < requested:
            record["reduced"] = (
                f"{iterations:,} of the {requested:,} iterations: as many as fit in the {budget.left():.0f} s left "
                f"(measured {probe['timings']['per_iteration_ms']:.2f} ms per meta-iteration in the probe)"
            )
    probe_output = output if "probe" in record else ""
    result, output, wall, error = _run_demo(args, device, iterations, png, budget.left() - 5, out / "demo.log")
    record.update(iterations=iterations, wall_s=wall, output_tail=_tail(output, 12))
    if error is not None:
        record.update(status="failed", error=error)
        if probe_output:  # the probe's table is still worth showing
            record["table_text"] = f"(the {PROBE_ITERATIONS}-iteration probe's)\n" + _demo_table_text(probe_output)
        return None
    assert result is not None
    record.update(
        table=result.get("table"),
        timings=result.get("timings"),
        compile=result.get("compile"),
        table_text=_demo_table_text(output),
    )
    return None


def _demo_table_text(output: str) -> str:
    """The table the demo prints: from its ``MSE on ...`` line to the ``wrote ...`` line."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("MSE on")), None)
    if start is None:
        return ""
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("wrote ")), len(lines))
    return "\n".join(lines[start:end]).rstrip()


def demo_without_plot(argv: list[str]) -> int:
    """``python -m higher demo ARGS`` with the plot left out: where matplotlib is not installed (the
    demo refuses to start without it), the numbers are still worth having."""
    from higher import cli
    from higher.demos import sinusoid

    sinusoid.pyplot = lambda: None  # type: ignore[assignment]  # the check at the start
    sinusoid.plot = lambda *args, **kwargs: None  # type: ignore[assignment]  # the figure at the end
    return cli.main(argv)


# ------------------------------------------------------------------ the markdown
def _cell(value: Any, form: str = "{:.2f}") -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return form.format(value)


def markdown(report: dict) -> str:
    steps = report["steps"]
    environment = steps.get("environment", {})
    device_name = environment.get("gpu") or platform.processor() or "CPU"
    title = f"# gpu-check: {device_name}, {report['date']}"
    kind = "dry run (--quick)" if report["quick"] else "full sizes"
    lines = [
        title,
        "",
        f"Device `{report['device']}`, {kind}, time budget {report['budget_s']:.0f} s, "
        f"{report.get('elapsed_s', 0):.0f} s used.",
        "",
        "## Steps",
        "",
        "| step | status | seconds | note |",
        "|---|---|---:|---|",
    ]
    for name, step in steps.items():
        note = _one_line(step.get("error") or step.get("reason") or step.get("note") or "")
        lines.append(f"| {name} | {step['status']} | {_cell(step.get('seconds'), '{:.0f}')} | {note} |")
    if environment:
        lines += ["", "## Environment", "", "| | |", "|---|---|"]
        for key in (
            "gpu",
            "capability",
            "gpu_memory_gib",
            "nvidia_smi",
            "torch",
            "torch_cuda",
            "cudnn",
            "python",
            "jax",
            "jax_source",
            "numpy",
            "pytest",
            "matplotlib",
            "tqdm",
            "higher",
            "commit",
            "cpu_count",
            "platform",
        ):
            if key in environment:
                value = environment[key]
                if isinstance(value, dict):
                    value = ", ".join(f"{k} {v}" for k, v in value.items())
                lines.append(f"| {key} | {'' if value is None else str(value).replace('|', '/')} |")
    tests = steps.get("tests", {})
    if "command" in tests:
        lines += ["", "## Device tests", ""]
        if "command" in tests:
            lines.append(
                f"`{tests['command']}` (time cap {tests.get('timeout_s')} s), exit status {tests.get('exit_status')}"
            )
        counts = tests.get("counts")
        if counts:
            lines.append("")
            lines.append(", ".join(f"{value} {key.replace('_', ' ')}" for key, value in counts.items()))
        for kind in ("failed", "errors", "collection_errors"):
            for name in tests.get(kind, [])[:50]:
                lines.append(f"- {kind.replace('_', ' ')}: `{name}`")
        if tests.get("note"):
            lines += ["", tests["note"]]
    timings = steps.get("timings", {})
    if timings.get("workloads"):
        lines += [
            "",
            f"## Meta-iterations on {timings['device']}",
            "",
            f"{timings['precision']}; inner optimizer {timings['optimizer']}; torch.compile backend "
            f"{timings['backend']}; {timings['warmup']} warm-up and up to {timings['rounds']} timed rounds, "
            "interleaved; median. Time ratio: this row's time / the compared row's (goal: at most). Peak: "
            "memory of one meta-iteration above what was allocated before it. Meta-gradient: largest "
            "difference to the hand-written per-task loop's, relative to its largest entry, in float32 "
            f"(agrees at most {CHECK_TOLERANCE:g}); where that misses, in float64 too (at most "
            f"{CHECK_TOLERANCE_64:g}: max-pool and ReLU make float32 rounding alone jump past the first).",
            "",
            "| workload | implementation | median ms | meta-it/s | compared with | time ratio | goal | peak MiB "
            "| first call s | meta-gradient | status |",
            "|---|---|---:|---:|---|---:|---|---:|---:|---:|---|",
        ]
        for result in timings["workloads"]:
            if "rows" not in result:
                lines.append(
                    f"| {result['workload']} | | | | | | | | | | failed: {_one_line(result.get('error', ''))} |"
                )
                continue
            for row in result["rows"].values():
                goal = ""
                if row.get("goal") is not None:
                    verdict = {True: "met", False: "missed"}.get(row.get("goal_met"), "")
                    goal = f"≤ {row['goal']:.1f}x {verdict}".strip()
                grad = _cell(row.get("grad_error"), "{:.1e}")
                if "grad_error64" in row:
                    grad += f" (float64 {row['grad_error64']:.1e})"
                if row.get("grad_recheck_error"):
                    grad += f" (float64 recheck failed: {row['grad_recheck_error']})"
                if row.get("grad_ok") is False:
                    grad += " WRONG"
                elif row.get("grad_recheck_error"):
                    grad += " UNCHECKED"
                peak = row.get("peak_mib")
                status = row.get("status", "")
                if row.get("reason"):
                    status += f": {_one_line(row['reason'], 300)}"
                lines.append(
                    f"| {result['workload']} | {row['label']} | {_cell(row.get('median_ms'))} | "
                    f"{_cell(row.get('per_second'), '{:.1f}')} | {LABELS.get(row.get('reference') or '', '')} | "
                    f"{_cell(row.get('ratio'), '{:.2f}x')} | {goal} | "
                    f"{'n/a' if peak is None and status.startswith('timed') else _cell(peak, '{:.1f}')} | "
                    f"{_cell(row.get('first_call_s'), '{:.1f}')} | {grad} | {status} |"
                )
        lines += [""] + [f"- {r['workload']}: {r.get('description', '')}" for r in timings["workloads"]]
    demo = steps.get("demo", {})
    if demo.get("status") in ("ok", "failed") and ("iterations" in demo or "error" in demo):
        lines += ["", "## Demo", ""]
        if demo.get("timings"):
            timings_ = demo["timings"]
            lines.append(
                f"`python -m higher demo --device {demo['device']}`: {demo['iterations']:,} iterations "
                f"(of {demo['requested_iterations']:,} asked), {_cell(demo.get('wall_s'), '{:.0f}')} s in all, "
                f"{_cell(timings_.get('per_iteration_ms'))} ms per meta-iteration."
            )
        if demo.get("reduced"):
            lines += ["", f"Reduced: {demo['reduced']}."]
        if demo.get("note"):
            lines += ["", demo["note"]]
        if demo.get("table_text"):
            lines += ["", "```text", demo["table_text"], "```"]
        if demo.get("error"):
            lines += ["", f"Failed: {demo['error']}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes everywhere: the dry run")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: $OUT if set, else .gpu-check/ in the checkout)"
    )
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run (default 540)")
    parser.add_argument("--tests", nargs="+", default=["tests"], help="what pytest collects (default: tests)")
    parser.add_argument("--keyword", default="cuda", help="pytest -k expression of the device tests (default cuda)")
    parser.add_argument("--tests-timeout", type=float, default=120.0, help="seconds for the tests (default 120)")
    parser.add_argument("--workloads", default="sine,deep,conv", help="comma-separated: sine, deep, conv")
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"), help="inner optimizer (default sgd)")
    parser.add_argument(
        "--backend", default=None, help="torch.compile backend (default inductor; --quick on CPU: eager)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 3; --quick 1)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds at most (default 20; --quick 3)")
    parser.add_argument("--min-rounds", type=int, default=3, help="timed rounds even past the time share (default 3)")
    parser.add_argument("--timings-cap", type=float, default=TIMINGS_CAP_S, help="seconds for the timings at most")
    parser.add_argument("--demo-reserve", type=float, default=DEMO_RESERVE_S, help="seconds kept for the demo")
    parser.add_argument(
        "--demo-iterations", type=int, default=None, help=f"demo iterations (default {DEMO_ITERATIONS:,}; --quick 20)"
    )
    parser.add_argument(
        "--demo-no-plot", action="store_true", help="run the demo without its plot even with matplotlib"
    )
    parser.add_argument("--no-jax", action="store_true", help="leave JAX out even where it is importable")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out: tests, timings, demo")
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.rounds = args.rounds if args.rounds is not None else (3 if args.quick else 20)
    args.min_rounds = min(args.min_rounds, args.rounds)
    if args.demo_iterations is None:
        args.demo_iterations = 20 if args.quick else DEMO_ITERATIONS
    if args.out is None:
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / ".gpu-check"
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--demo-without-plot"]:
        return demo_without_plot(argv[1:])
    args = parse_args(argv)
    on_cpu = args.device.startswith("cpu")
    # Before torch is imported: one CPU thread as elsewhere in the benchmarks; on a GPU machine the
    # compile workers may use every core (benchmarks/compiled.py, imported later, would set 1).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1" if on_cpu else str(os.cpu_count() or 1))
    # The child processes (pytest, the demo, JAX) import this checkout's package and benchmarks too.
    paths = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    if args.backend is None:
        args.backend = "eager" if args.quick and on_cpu else "inductor"
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget)
    report: dict[str, Any] = {
        "tool": "benchmarks/gpu_check.py",
        "date": _now_utc(),
        "argv": argv,
        "device": args.device,
        "quick": args.quick,
        "budget_s": args.budget,
        "out": str(out),
        "steps": {},
    }
    import torch

    torch.set_num_threads(1)
    device = torch.device(args.device)
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    run_step("environment", report, out, budget, 0, lambda record: step_environment(record, device, not args.no_jax))
    run_step("tests", report, out, budget, 30, lambda record: step_tests(record, args, out, budget), skip)
    timings_need = args.demo_reserve + 30
    run_step(
        "timings", report, out, budget, timings_need, lambda record: step_timings(record, args, device, budget), skip
    )
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()  # the demo's process gets the memory this one cached
    run_step("demo", report, out, budget, 20, lambda record: step_demo(record, args, device, out, budget), skip)
    write_outputs(report, out)
    print(markdown(report))
    print(f"[gpu-check] wrote {out / 'gpu-check.json'} and {out / 'gpu-check.md'}", flush=True)
    return 1 if any(step["status"] == "failed" for step in report["steps"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
