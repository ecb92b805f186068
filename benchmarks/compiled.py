"""Compiled meta-iterations side by side with JAX (issue 9): time, compile time, memory.

    python benchmarks/run.py --setup          # once: installs JAX (and the other competitors) into .bench/
    python benchmarks/compiled.py             # sine and deep, SGD and Adam
    python benchmarks/compiled.py --workloads conv --compile-timeout 600   # conv: compiles take minutes
    python benchmarks/compiled.py --workloads sine --optimizers sgd --rounds 20 --json out.json
    python benchmarks/compiled.py --variants tfunc_compiled --options cpp_wrapper=True --mode max-autotune-no-cudagraphs

For each workload and inner optimizer, one process builds every variant on its own copy of the
same model and data (one thread; JAX in a child process handed the very same weights and data;
both pinned to the same core, ``--no-pin`` to pin JAX only: XLA's documented one-thread flags,
``--xla-flags``, make JAX 2.4x slower on this CPU even on one core), takes the first call of each (for a compiled variant: trace + compile + run;
its wall time is the "compile" column), checks every meta-gradient against the hand-written
torch reference (``benchmarks/implementations.build_vmap``; a variant that disagrees is not
timed), then times them in interleaved rounds (a new random order each round) and reports the
median time per meta-iteration and its ratio to the faster JAX variant. With
``--compile-timeout S``, a compiled variant whose first call runs past S seconds is stopped and
shown as ``not compiled: ...`` (so is one whose compilation raises: ``failed: ...``). The variants:

- ``jax``: ``jax.jit(jax.value_and_grad(meta_loss))``, ``jax.vmap`` over tasks
  (``benchmarks/jax_workloads.py``: sine, deep and conv; skipped when ``.bench/jax`` is missing);
  ``jax_map``: the same with ``jax.lax.map`` over tasks (a loop inside the compiled function: on
  conv, vmap of per-task weights makes grouped convolutions);
- ``tfunc_compiled``: ``torch.compile(torch.func.grad_and_value(meta_loss), fullgraph=True)`` of
  a hand-written torch.func meta-loss (``vmap`` over tasks of an inner loop of ``torch.func.grad``);
  ``tfunc_backward_compiled``: the meta-loss compiled, ``.backward()`` outside;
  ``tfunc_eager``: the same meta-loss, not compiled (``grad_and_value``);
- ``ours_compiled_batched`` / ``ours_compiled_per_task``: a meta-iteration written with the public
  API (``innerloop_ctx``, ``diffopt.step(loss)``, or ``diffopt.step(closure=...)`` with
  ``--step-form closure``), wrapped in ``torch.compile(fullgraph=True)``; a variant whose compilation
  raises shows ``failed: <reason>`` in the table;
- ``ours_compiled_whole``: batched, with the backward pass inside the compiled function
  (``higher.compiled.backward(loss)`` instead of ``.backward()`` on its result): one graph for
  the whole meta-iteration;
- ``ours_batched`` / ``ours``: the eager ones of ``benchmarks/run.py`` (``tasks=T`` / per task).

Unless ``--no-cache-times``, each compiled variant is also compiled in two fresh
processes sharing a ``TORCHINDUCTOR_CACHE_DIR`` under ``.bench/``: the first with the cache
cleared (cold), the second finding it populated (warm); each reports its inductor FX graph cache
and AOTAutograd cache hits, so a "warm" process that missed the cache shows it.
Unless ``--no-memory``, fresh processes measure what four meta-iterations add to the
resident set after the warm-up (the free heap handed back with ``malloc_trim`` and the
high-water mark reset after compiling, through ``/proc/self/clear_refs``), and the peak of the
whole process including the compile; the compiled/eager ratio compares the former.

``--backend aot_eager`` traces the compiled variants without generating kernels (the smoke test
of ``tests/test_benchmarks_compiled.py``); its times say nothing about inductor's. An eager
variant whose float32 meta-gradient misses the check is checked again in float64 (Adam's
``sqrt(v) + eps`` with gradients near eps amplifies float32 rounding: conv per task), timed if that
agrees, with a note.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import ctypes
import gc
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
# The cold/warm and memory processes' cache; HIGHER_BENCH_CACHE_DIR moves it (the tests: a private one per
# test, out of the checkout).
CACHE_DIR = Path(os.environ.get("HIGHER_BENCH_CACHE_DIR") or ROOT / ".bench" / "inductor-cache")
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # this process: a private, empty cache
    _private_cache = tempfile.mkdtemp(prefix="inductor-cache-")
    atexit.register(shutil.rmtree, _private_cache, True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _private_cache
for path in (str(ROOT / "src"), str(ROOT)):  # measure this checkout's higher
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.func import grad_and_value, vmap  # noqa: E402

from benchmarks import competitors  # noqa: E402
from benchmarks.implementations import (  # noqa: E402
    _torch_optimizer,
    build_ours,
    build_ours_batched,
    build_vmap,
    safe_sqrt,
    vmap_grad_meta_loss,
)
from benchmarks.jax_workloads import JAX_WORKLOADS, JaxRunner, export  # noqa: E402
from benchmarks.run import _data, _machine, _model, _progress, _status_bytes  # noqa: E402
from benchmarks.workloads import WORKLOADS, Workload, tiny  # noqa: E402

Data = tuple[Tensor, Tensor, Tensor, Tensor]
MetaIteration = Callable[[], None]
#: Relative tolerance (to the largest entry) of the float32 meta-gradient check of the torch variants.
CHECK_TOLERANCE = 1e-3
#: And of JAX's float64 meta-gradient against the torch reference's.
CHECK_TOLERANCE_64 = 1e-8


@dataclass(frozen=True)
class Settings:
    """How to compile (from the command line)."""

    mode: str | None = None
    options: dict | None = None
    fullgraph: bool = True
    step_form: str = "loss"  # or "closure": diffopt.step(closure=...)
    backend: str = "inductor"  # "aot_eager": traced, not compiled to kernels (the fast smoke test)

    def compile(self, fn: Callable) -> Callable:
        kwargs: dict = {"fullgraph": self.fullgraph}
        if self.backend != "inductor":
            if self.mode or self.options:
                raise ValueError("--mode and --options are inductor's: leave them out with --backend " + self.backend)
            return torch.compile(fn, backend=self.backend, **kwargs)
        if self.mode and self.options:  # torch.compile takes one or the other: the mode as options
            kwargs["options"] = {**torch._inductor.list_mode_options(self.mode), **self.options}
        elif self.mode:
            kwargs["mode"] = self.mode
        elif self.options:
            kwargs["options"] = self.options
        return torch.compile(fn, **kwargs)


# ------------------------------------------------------------------ hand-written torch.func
def _build_tfunc(compiled: bool, own: Settings | None = None) -> Callable:
    """``own``: compile with these settings instead of the command line's (the options sweep)."""

    def build(workload: Workload, model: nn.Module, data: Data, optimizer: str, settings: Settings) -> MetaIteration:
        step = grad_and_value(vmap_grad_meta_loss(workload, model, optimizer))
        if compiled:
            step = (own or settings).compile(step)
        params = dict(model.named_parameters())

        def meta_iteration() -> None:
            grads, _ = step({name: p.detach() for name, p in params.items()}, *data)
            for name, p in params.items():
                p.grad = grads[name] if p.grad is None else p.grad + grads[name]

        return meta_iteration

    return build


def build_tfunc_backward_compiled(
    workload: Workload, model: nn.Module, data: Data, optimizer: str, settings: Settings
) -> MetaIteration:
    meta_loss = settings.compile(vmap_grad_meta_loss(workload, model, optimizer))
    params = dict(model.named_parameters())
    return lambda: meta_loss(params, *data).backward()


# ------------------------------------------------------------------ ours, compiled (public API)
def _step(diffopt, closure: Callable[[], Tensor], settings: Settings) -> None:
    if settings.step_form == "closure":
        diffopt.step(closure=closure)
    else:
        diffopt.step(closure())


def build_ours_compiled_batched(
    workload: Workload, model: nn.Module, data: Data, optimizer: str, settings: Settings
) -> MetaIteration:
    """``innerloop_ctx(..., tasks=T)`` in a function wrapped in ``torch.compile``, as a user writes it."""
    import higher

    support_x, support_y, query_x, query_y = data
    inner_opt = _torch_optimizer(model, workload, optimizer)
    task_losses = vmap(workload.loss)  # per-task losses, shape [T]
    tasks, steps = workload.tasks, workload.inner_steps

    def meta_loss() -> Tensor:
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False, tasks=tasks) as (fmodel, diffopt):
            for _ in range(steps):
                _step(diffopt, lambda: task_losses(fmodel(support_x), support_y), settings)
            return task_losses(fmodel(query_x), query_y).mean()

    compiled = settings.compile(meta_loss)
    return lambda: compiled().backward()


def build_ours_compiled_whole(
    workload: Workload, model: nn.Module, data: Data, optimizer: str, settings: Settings
) -> MetaIteration:
    """Batched, with the backward pass inside the compiled function (``higher.compiled.backward``)."""
    import higher

    support_x, support_y, query_x, query_y = data
    inner_opt = _torch_optimizer(model, workload, optimizer)
    task_losses = vmap(workload.loss)
    tasks, steps = workload.tasks, workload.inner_steps

    def meta_iteration() -> Tensor:
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False, tasks=tasks) as (fmodel, diffopt):
            for _ in range(steps):
                _step(diffopt, lambda: task_losses(fmodel(support_x), support_y), settings)
            loss = task_losses(fmodel(query_x), query_y).mean()
        higher.compiled.backward(loss)
        return loss.detach()

    compiled = settings.compile(meta_iteration)
    return lambda: compiled()


def build_ours_compiled_per_task(
    workload: Workload, model: nn.Module, data: Data, optimizer: str, settings: Settings
) -> MetaIteration:
    """A Python loop over tasks, one ``innerloop_ctx`` each, in a function wrapped in ``torch.compile``."""
    import higher

    support_x, support_y, query_x, query_y = data
    inner_opt = _torch_optimizer(model, workload, optimizer)
    loss_fn, tasks, steps = workload.loss, workload.tasks, workload.inner_steps

    def meta_loss() -> Tensor:
        total: Tensor | float = 0.0
        for t in range(tasks):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(steps):
                    # the closure runs inside the step, while t is current
                    _step(diffopt, lambda: loss_fn(fmodel(support_x[t]), support_y[t]), settings)  # noqa: B023
                total = total + loss_fn(fmodel(query_x[t]), query_y[t]) / tasks
        assert isinstance(total, Tensor)
        return total

    compiled = settings.compile(meta_loss)
    return lambda: compiled().backward()


def _eager(build: Callable) -> Callable:
    return lambda workload, model, data, optimizer, settings: build(workload, model, data, optimizer)


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    build: Callable | None  # None: JAX (a child process)
    compiled: bool = False
    eager: str = ""  # the eager counterpart, for the memory ratio


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("jax", "JAX jit + vmap", None, compiled=True),
        Variant("jax_map", "JAX jit + lax.map over tasks", None, compiled=True),
        Variant(
            "tfunc_compiled",
            "torch.compile(torch.func.grad_and_value(vmap meta-loss))",
            _build_tfunc(True),
            True,
            "tfunc_eager",
        ),
        Variant(
            "tfunc_backward_compiled",
            "torch.compile(vmap meta-loss) + .backward()",
            build_tfunc_backward_compiled,
            True,
            "tfunc_eager",
        ),
        Variant("ours_compiled_batched", "ours compiled, batched", build_ours_compiled_batched, True, "ours_batched"),
        Variant(
            "ours_compiled_whole",
            "ours compiled, batched, backward inside",
            build_ours_compiled_whole,
            True,
            "ours_batched",
        ),
        Variant("ours_compiled_per_task", "ours compiled, per task", build_ours_compiled_per_task, True, "ours"),
        Variant("ours_batched", "ours eager, batched", _eager(build_ours_batched)),
        Variant("ours", "ours eager, per task", _eager(build_ours)),
        Variant("tfunc_eager", "hand-written torch.func vmap, eager", _build_tfunc(False)),
    )
}


#: The JAX variants: how each maps the meta-loss over tasks (``jax_workloads.build``).
JAX_TASKS = {"jax": "vmap", "jax_map": "map"}

#: Inductor settings tried on the compiled torch.func meta-iteration (``--variants`` names
#: ``tfunc_compiled@KEY``, or ``--options-sweep`` for all): which compiles the fastest code.
SWEEP: dict[str, Settings] = {
    "default": Settings(),
    "cpp_wrapper": Settings(options={"cpp_wrapper": True}),
    "freezing": Settings(options={"freezing": True}),
    "max_autotune": Settings(mode="max-autotune-no-cudagraphs"),
    "max_autotune_cpp_wrapper": Settings(mode="max-autotune-no-cudagraphs", options={"cpp_wrapper": True}),
}
for _key, _settings in SWEEP.items():
    VARIANTS[f"tfunc_compiled@{_key}"] = Variant(
        f"tfunc_compiled@{_key}",
        f"torch.compile(torch.func ...), {_key}",
        _build_tfunc(True, _settings),
        True,
        "tfunc_eager",
    )

#: What runs without --variants: all but the second compiled torch.func form (its numbers are
#: those of ``tfunc_compiled`` or worse, for another full compile per workload) and the sweep.
DEFAULT_VARIANTS = [name for name in VARIANTS if name != "tfunc_backward_compiled" and "@" not in name]


def _short(error: BaseException) -> str:
    """The first line of the error, with dynamo's explanation when it has one; at most 200 characters."""
    lines = f"{type(error).__name__}: {error}".strip().splitlines()
    text = lines[0]
    explanation = [line.strip() for line in lines if line.strip().startswith("Explanation:")]
    if explanation:
        text += f" ({explanation[0].removeprefix('Explanation:').strip()})"
    text = text.replace("|", "/")  # a markdown table cell
    return text if len(text) <= 200 else text[:197] + "..."


def _flat_grad(model: nn.Module) -> Tensor:
    return torch.cat(
        [(p.grad if p.grad is not None else torch.full_like(p, float("nan"))).reshape(-1) for p in model.parameters()]
    )


def _compare(ours: Tensor, reference: Tensor) -> tuple[float, int]:
    """Largest difference on the entries finite in both, relative to the reference's largest entry; NaN count."""
    finite = torch.isfinite(ours) & torch.isfinite(reference)
    bad = int((~torch.isfinite(ours)).sum())
    if not finite.any():
        return float("nan"), bad
    return ((ours - reference)[finite].abs().max() / reference.abs().max()).item(), bad


#: The reference meta-gradients computed so far: (id of the workload, optimizer, dtype) -> (workload, gradient).
_REFERENCES: dict[tuple[int, str, torch.dtype], tuple[Workload, Tensor]] = {}


def _reference(workload: Workload, optimizer: str, dtype: torch.dtype) -> Tensor:
    """The hand-written vmap meta-gradient (Adam with a sqrt of slope 0 at 0, as in benchmarks/run.py),
    computed once per workload, optimizer and dtype (every variant is checked against it)."""
    key = (id(workload), optimizer, dtype)
    if key in _REFERENCES and _REFERENCES[key][0] is workload:
        return _REFERENCES[key][1]
    model = _model(workload, dtype)
    with safe_sqrt():
        build_vmap(workload, model, _data(workload, dtype), optimizer)()
    _REFERENCES[key] = (workload, _flat_grad(model))  # keeps the workload, so its id is not reused
    return _REFERENCES[key][1]


def _jax_cpu() -> int:
    return max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0


def _jax_loss(workload: Workload) -> str:
    """The JAX side's name of the workload's loss function."""
    if workload.loss is F.mse_loss:
        return "mse"
    if workload.loss is F.cross_entropy:
        return "cross_entropy"
    raise ValueError(f"no JAX version of the loss {workload.loss} of workload {workload.name}")


def export_workload(
    workload: Workload, model: nn.Module, data: tuple, optimizer: str, npz: Path, tasks: str = "vmap"
) -> Path:
    """``model``'s weights and ``data`` into ``npz`` for the JAX child, with the workload's inner loop
    (its learning rate for ``optimizer``, its steps and its loss); returns ``npz``."""
    export(
        model,
        data,
        npz,
        workload=workload.name,
        optimizer=optimizer,
        lr=workload.lr[optimizer],
        steps=workload.inner_steps,
        loss=_jax_loss(workload),
        tasks=tasks,
    )
    return npz


def _start_jax(
    workload: Workload, optimizer: str, dtype: torch.dtype, folder: Path, xla_flags: str, tasks: str = "vmap"
) -> JaxRunner:
    npz = folder / f"{workload.name}-{optimizer}-{str(dtype).split('.')[-1]}-{tasks}.npz"
    export_workload(workload, _model(workload, dtype), _data(workload, dtype), optimizer, npz, tasks)
    return JaxRunner(npz, cpu=_jax_cpu(), xla_flags=xla_flags)


class CompileTimeout(BaseException):
    """The first call of a compiled variant ran past ``--compile-timeout`` (a BaseException, so that
    no ``except Exception`` in the compiler swallows it)."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise :class:`CompileTimeout` in this (main) thread after ``seconds`` (0: no limit).

    The signal is handled between Python bytecodes: a C++ compiler subprocess that inductor is
    waiting for finishes first, so the stop can come a few seconds late.
    """
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def stop(signum, frame):
        raise CompileTimeout

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def measure(workload: Workload, optimizer: str, names: list[str], settings: Settings, args: argparse.Namespace) -> dict:
    """Build, check and time the variants; returns the result record of this workload and optimizer."""
    reference = _reference(workload, optimizer, torch.float32)
    base = _model(workload, torch.float32)
    data = _data(workload, torch.float32)
    built: dict[str, Callable[[], float]] = {}
    record: dict = {"workload": workload.name, "description": workload.description, "optimizer": optimizer}
    compile_s, failed, details, check, notes = {}, {}, {}, {}, []
    folder = Path(tempfile.mkdtemp(prefix="compiled-bench-"))
    runners: list[JaxRunner] = []
    try:
        for name in _progress(names, len(names), f"{workload.name}/{optimizer} build", not args.quiet):
            variant = VARIANTS[name]
            if variant.build is None:
                tasks = JAX_TASKS[name]
                try:
                    if not args.no_check:
                        checker = _start_jax(workload, optimizer, torch.float64, folder, args.xla_flags, tasks)
                        checker.close()
                        error, bad = _compare(
                            torch.tensor(checker.grads, dtype=torch.float64),
                            _reference(workload, optimizer, torch.float64),
                        )
                        check[name] = {"float64_error": error, "nonfinite": bad}
                        if not error <= CHECK_TOLERANCE_64:
                            failed[name] = f"wrong meta-gradient (float64 relative difference {error:.2g})"
                            continue
                    runner = _start_jax(workload, optimizer, torch.float32, folder, args.xla_flags, tasks)
                    runners.append(runner)
                except Exception as error:  # a broken JAX install must not stop the torch measurements
                    failed[name] = "failed: " + _short(error)
                    continue
                compile_s[name] = runner.compile_s
                error, bad = _compare(torch.tensor(runner.grads), reference)
                check[name] = {**check.get(name, {}), "float32_error": error, "nonfinite": bad}
                built[name] = runner.time_one
                continue
            model = copy.deepcopy(base)
            start = time.perf_counter()
            try:
                meta_iteration = variant.build(workload, model, data, optimizer, settings)
                with _time_limit(args.compile_timeout if variant.compiled else 0):
                    meta_iteration()
                compile_s[name] = time.perf_counter() - start
            except CompileTimeout:
                failed[name] = f"not compiled: first call stopped after {time.perf_counter() - start:.0f} s"
                details[name] = f"--compile-timeout {args.compile_timeout:g} s reached"
                torch._dynamo.reset()
                continue
            except Exception as error:
                failed[name] = "failed: " + _short(error)
                details[name] = f"{type(error).__name__}: {error}"[:4000]
                torch._dynamo.reset()
                continue
            error, bad = _compare(_flat_grad(model), reference)
            check[name] = {"float32_error": error, "nonfinite": bad}
            if bad:
                notes.append(f"{name}: {bad} of {reference.numel()} meta-gradient entries are NaN/inf")
            if bad == reference.numel() and not args.no_check:  # nothing left to compare
                failed[name] = f"not checked: all {bad} meta-gradient entries NaN/inf"
                continue
            if error > CHECK_TOLERANCE and not args.no_check:
                if variant.compiled:
                    failed[name] = f"wrong meta-gradient (relative difference {error:.2g})"
                    continue
                # Eager: float32 rounding or a wrong result? Adam divides by sqrt(v) + eps: with
                # gradient entries near eps, float32 rounding moves its second-order terms a lot
                # (seen on conv per task); the float64 meta-gradient decides.
                model64 = _model(workload, torch.float64)
                variant.build(workload, model64, _data(workload, torch.float64), optimizer, settings)()
                error64, _ = _compare(_flat_grad(model64), _reference(workload, optimizer, torch.float64))
                check[name]["float64_error"] = error64
                if not error64 <= CHECK_TOLERANCE_64:
                    failed[name] = f"wrong meta-gradient (relative difference {error:.2g}, float64 {error64:.2g})"
                    continue
                notes.append(
                    f"{name}: float32 meta-gradient {error:.2g} from the float32 reference, but the float64 one "
                    f"agrees to {error64:.2g}: float32 rounding"
                )

            def timed(model=model, meta_iteration=meta_iteration) -> float:
                for p in model.parameters():
                    p.grad = None
                gc.collect()
                start = time.perf_counter()
                meta_iteration()
                return time.perf_counter() - start

            built[name] = timed
        times: dict[str, list[float]] = {name: [] for name in built}
        order = list(built)
        shuffle = random.Random(0).shuffle
        total = args.warmup + args.rounds
        for r in _progress(range(total), total, f"{workload.name}/{optimizer} time", not args.quiet):
            shuffle(order)
            for name in order:
                elapsed = built[name]()
                if r >= args.warmup:
                    times[name].append(elapsed)
    finally:
        for runner in runners:
            runner.close()
        shutil.rmtree(folder, ignore_errors=True)
    record.update(
        median_ms={name: 1000 * statistics.median(ts) for name, ts in times.items() if ts},
        times_ms={name: [1000 * t for t in ts] for name, ts in times.items()},
        compile_s=compile_s,
        failed=failed,
        failure_details=details,
        check=check,
        notes=notes,
        cache={},
        memory={},
    )
    return record


# ------------------------------------------------------------------ fresh processes
def _child_settings(args: argparse.Namespace) -> list[str]:
    command = ["--step-form", args.step_form]
    if args.mode:
        command += ["--mode", args.mode]
    for option in args.options:
        command += ["--options", option]
    if args.no_fullgraph:
        command.append("--no-fullgraph")
    return command + ["--backend", args.backend]


def _run_child(kind: str, spec: str, args: argparse.Namespace, env: dict) -> dict:
    command = [sys.executable, __file__, kind, spec, *_child_settings(args)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def compile_times(spec: str, args: argparse.Namespace) -> dict:
    """First-call time of a fresh process with the cache cleared (cold), then of another (warm)."""
    shutil.rmtree(CACHE_DIR, ignore_errors=True)
    CACHE_DIR.mkdir(parents=True)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(CACHE_DIR)}
    return {
        "cold": _run_child("--compile-child", spec, args, env),
        "warm": _run_child("--compile-child", spec, args, env),
    }


def memory(spec: str, args: argparse.Namespace) -> dict:
    """See :func:`memory_child`; glibc's mmap threshold fixed as in benchmarks/run.py."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TORCHINDUCTOR_CACHE_DIR": str(CACHE_DIR)}
    return _run_child("--memory-child", spec, args, env)


def _child_build(spec: str, settings: Settings) -> tuple[nn.Module, MetaIteration]:
    workload_name, optimizer, name, small = spec.split(":")
    workload = tiny(WORKLOADS[workload_name]) if small == "tiny" else WORKLOADS[workload_name]
    torch.set_num_threads(1)
    model = _model(workload, torch.float32)
    build = VARIANTS[name].build
    assert build is not None
    return model, build(workload, model, _data(workload, torch.float32), optimizer, settings)


#: The compile caches' counters a fresh process reports: whether "warm" really found its graphs.
CACHE_COUNTERS = {
    "fx_hit": ("inductor", "fxgraph_cache_hit"),
    "fx_miss": ("inductor", "fxgraph_cache_miss"),
    "fx_bypass": ("inductor", "fxgraph_cache_bypass"),
    "aot_hit": ("aot_autograd", "autograd_cache_hit"),
    "aot_miss": ("aot_autograd", "autograd_cache_miss"),
    "aot_bypass": ("aot_autograd", "autograd_cache_bypass"),
}


def compile_child(spec: str, settings: Settings) -> None:
    """Prints the wall time of the first meta-iteration (trace, compile or load from the cache, run),
    and the hits and misses of inductor's FX graph cache and of the AOTAutograd cache."""
    from torch._dynamo.utils import counters

    model, meta_iteration = _child_build(spec, settings)
    start = time.perf_counter()
    meta_iteration()
    result: dict = {"first_call_s": time.perf_counter() - start}
    result.update({key: counters[group][name] for key, (group, name) in CACHE_COUNTERS.items()})
    print(json.dumps(result))


def _malloc_trim() -> None:
    """Hand glibc's free heap memory back to the system (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_child(spec: str, settings: Settings) -> None:
    """Peak RSS of the whole process (compile included), and what a meta-iteration needs after warm-up.

    After two warm-up meta-iterations (the compile, the code paged in), the gradients are freed,
    the free heap is handed back to the system (``malloc_trim``: otherwise the memory freed by the
    warm-up is reused without showing in the RSS) and the high-water mark is reset to the current
    RSS (``/proc/self/clear_refs``); ``peak - before`` is then the most that four more
    meta-iterations hold at once.
    """
    model, meta_iteration = _child_build(spec, settings)
    for _ in range(2):
        for p in model.parameters():
            p.grad = None
        meta_iteration()
    for p in model.parameters():
        p.grad = None
    gc.collect()
    process_peak = _status_bytes("VmHWM")
    _malloc_trim()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_bytes("VmRSS")
    for _ in range(4):
        for p in model.parameters():
            p.grad = None
        meta_iteration()
    peak = _status_bytes("VmHWM")
    print(json.dumps({"process_peak": process_peak, "before": before, "peak": peak}))


# ------------------------------------------------------------------ tables
def _cell_ms(record: dict, name: str) -> str:
    if name in record["failed"]:
        return record["failed"][name]
    ms = record["median_ms"].get(name)
    return "" if ms is None else f"{ms:.2f}"


def _jax_ms(record: dict) -> float | None:
    """The faster JAX variant's median time: the ratios' reference."""
    times = [record["median_ms"][n] for n in JAX_TASKS if n in record["median_ms"]]
    return min(times) if times else None


def _cache_cell(result: dict) -> str:
    """``first call s [fx hits/graphs, aot hits/graphs]`` of a fresh process (see :func:`compile_child`)."""
    if "first_call_s" not in result:
        return result.get("error", "")
    cell = f"{result['first_call_s']:.1f}"
    if "fx_hit" in result:
        fx = result["fx_hit"] + result["fx_miss"] + result["fx_bypass"]
        aot = result["aot_hit"] + result["aot_miss"] + result["aot_bypass"]
        cell += f" [fx {result['fx_hit']}/{fx}, aot {result['aot_hit']}/{aot} hits]"
    return cell


def _table(records: list[dict]) -> str:
    lines = [
        "| workload | optimizer | variant | median ms | ratio to the faster JAX | first call s (compile) | fresh process cold s "
        "| fresh process warm s | added by 4 meta-iterations MiB | compiled / eager memory | process peak MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for record in records:
        jax = _jax_ms(record)
        for name in record["names"]:
            ms = record["median_ms"].get(name)
            ratio = f"{ms / jax:.2f}x" if ms is not None and jax else ""
            first = record["compile_s"].get(name)
            first_cell = f"{first:.1f}" if first is not None and VARIANTS[name].compiled else ""
            cache = record["cache"].get(name, {})
            cold, warm = (_cache_cell(cache.get(k, {})) for k in ("cold", "warm"))
            mem = record["memory"].get(name, {})
            # max(..., 0): the RSS read just after the reset can exceed the new high-water mark by a few pages
            added = f"{max(mem['peak'] - mem['before'], 0) / 2**20:.1f}" if "peak" in mem else mem.get("error", "")
            eager = record["memory"].get(VARIANTS[name].eager, {})
            to_eager = ""
            if "peak" in mem and "peak" in eager:  # a ratio only where eager adds measurably (0.1 MiB)
                eager_added = eager["peak"] - eager["before"]
                compiled_added = max(mem["peak"] - mem["before"], 0)
                to_eager = f"{compiled_added / eager_added:.2f}" if eager_added >= 2**20 / 10 else "n/a"
            process = f"{mem['process_peak'] / 2**20:.0f}" if "process_peak" in mem else ""
            lines.append(
                f"| {record['workload']} | {record['optimizer']} | {VARIANTS[name].label} | {_cell_ms(record, name)} | "
                f"{ratio} | {first_cell} | {cold} | {warm} | {added} | {to_eager} | {process} |"
            )
    return "\n".join(lines)


def _summary(records: list[dict]) -> str:
    names = [name for name in VARIANTS if any(name in r["names"] for r in records)]
    lines = [
        "| workload | optimizer | " + " | ".join(VARIANTS[n].label for n in names) + " |",
        "|---|---|" + "---:|" * len(names),
    ]
    for record in records:
        jax = _jax_ms(record)
        cells = []
        for name in names:
            ms = record["median_ms"].get(name)
            cell = _cell_ms(record, name)
            if ms is not None:
                cell = f"{ms:.2f} ms" + (f" ({ms / jax:.2f}x)" if jax and name not in JAX_TASKS else "")
            cells.append(cell)
        lines.append(f"| {record['workload']} | {record['optimizer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse_options(items: list[str]) -> dict | None:
    options = {}
    for item in items:
        for pair in item.split(","):
            key, _, value = pair.partition("=")
            options[key.strip()] = {
                "True": True,
                "true": True,
                "1": True,
                "False": False,
                "false": False,
                "0": False,
            }.get(value.strip(), value.strip())
    return options or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="sine,deep", help="comma-separated: " + ", ".join(WORKLOADS))
    parser.add_argument("--optimizers", default="sgd,adam", help="comma-separated: sgd, adam")
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help="comma-separated, default all but tfunc_backward_compiled: " + ", ".join(VARIANTS),
    )
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds after the first call (default 3)")
    parser.add_argument("--tiny", action="store_true", help="2 tasks, 2 steps: a smoke test")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument(
        "--options", action="append", default=[], help="inductor options, e.g. cpp_wrapper=True,freezing=True"
    )
    parser.add_argument("--no-fullgraph", action="store_true", help="allow graph breaks")
    parser.add_argument(
        "--backend",
        default="inductor",
        help="torch.compile backend (default inductor; aot_eager traces without compiling kernels: smoke tests)",
    )
    parser.add_argument(
        "--step-form",
        choices=("closure", "loss"),
        default="loss",
        help="ours: diffopt.step(loss) (default, as 0.2.1 programs write it) or diffopt.step(closure=...)",
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin this process to JAX's core (the last one it may use)"
    )
    parser.add_argument("--no-jax", action="store_true", help="leave JAX out (it is left out anyway if not installed)")
    parser.add_argument(
        "--xla-flags", default="", help=f"XLA_FLAGS of the JAX process (e.g. {competitors.ONE_THREAD_XLA_FLAGS!r})"
    )
    parser.add_argument("--no-check", action="store_true", help="time even variants whose meta-gradient disagrees")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--no-cache-times", action="store_true", help="skip the cold/warm compile processes")
    parser.add_argument(
        "--compile-timeout",
        type=float,
        default=0,
        help="seconds: a compiled variant whose first call takes longer is stopped and reported as not "
        "compiled (default 0: no limit)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--compile-child", help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--options-sweep", action="store_true", help="add tfunc_compiled under each inductor setting of SWEEP"
    )
    args = parser.parse_args(argv)
    settings = Settings(args.mode, _parse_options(args.options), not args.no_fullgraph, args.step_form, args.backend)
    if args.backend != "inductor" and (args.mode or args.options):
        parser.error(f"--mode and --options are inductor's: leave them out with --backend {args.backend}")
    if args.compile_child:
        compile_child(args.compile_child, settings)
        return 0
    if args.memory_child:
        memory_child(args.memory_child, settings)
        return 0

    torch.set_num_threads(1)
    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        # The same core as JAX's child: on a shared machine, both then see the same contention
        # (unpinned, torch would move to whichever core is free while JAX waits for its own).
        os.sched_setaffinity(0, {_jax_cpu()})
    names = args.variants.split(",")
    if args.options_sweep:
        names += [f"tfunc_compiled@{key}" for key in SWEEP if f"tfunc_compiled@{key}" not in names]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    skipped = []
    if any(n in JAX_TASKS for n in names) and (args.no_jax or not competitors.jax_installed()):
        names = [n for n in names if n not in JAX_TASKS]
        skipped.append("JAX: " + ("--no-jax" if args.no_jax else "not installed (python benchmarks/run.py --setup)"))
    load_at_start = os.getloadavg()[0]
    print(f"machine: {_machine()}")
    print(f"compile settings: {settings}")
    records = []
    for workload_name in args.workloads.split(","):
        workload = tiny(WORKLOADS[workload_name]) if args.tiny else WORKLOADS[workload_name]
        for optimizer in args.optimizers.split(","):
            here = [n for n in names if n not in JAX_TASKS or workload_name in JAX_WORKLOADS]
            record = measure(workload, optimizer, here, settings, args)
            record["names"] = here
            small = "tiny" if args.tiny else "full"
            measured = [n for n in here if n not in record["failed"] and n not in JAX_TASKS]
            if not args.no_cache_times:
                for name in [n for n in measured if VARIANTS[n].compiled]:
                    record["cache"][name] = compile_times(f"{workload_name}:{optimizer}:{name}:{small}", args)
            if not args.no_memory:
                for name in measured:
                    record["memory"][name] = memory(f"{workload_name}:{optimizer}:{name}:{small}", args)
            records.append(record)
            print(_table([record]), flush=True)
    load = f"{load_at_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    pinned = "torch and JAX" if not args.no_pin else "JAX"
    print(f"\nmachine: {_machine()}; {pinned} pinned to core {_jax_cpu()}; 1-minute load average {load}")
    print(f"compile settings: {settings}\n")
    print(_summary(records))
    print()
    print(_table(records))
    for record in records:
        for note in record["notes"]:
            print(f"note: {record['workload']}/{record['optimizer']}: {note}")
        for name, check in record["check"].items():
            print(f"check: {record['workload']}/{record['optimizer']}: {name}: {check}")
    for skip in skipped:
        print("skipped:", skip)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": _machine(),
                    "load": load,
                    "pinned_core": _jax_cpu(),
                    "torch_pinned": not args.no_pin,
                    "settings": {
                        "mode": args.mode,
                        "options": settings.options,
                        "fullgraph": settings.fullgraph,
                        "step_form": args.step_form,
                        "backend": args.backend,
                        "xla_flags": args.xla_flags,
                    },
                    "rounds": args.rounds,
                    "skipped": skipped,
                    "results": records,
                },
                indent=1,
            )
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
