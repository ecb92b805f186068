"""Where the time of a one-inner-step MAML task goes: ours against the hand-written loops, by phase.

    python benchmarks/one_step.py                 # sine1, SGD, 15 rounds of 25 tasks
    python benchmarks/one_step.py --json          # the same as JSON, for scripts

With one inner step (the MAML paper's setting, workload ``sine1``) opening the inner loop weighs
most, and ``benchmarks/run.py`` shows ours at about the hand-written loop's speed there. This
benchmark says why, in microseconds per task, by phase (open the inner loop, support forward,
inner step, query forward, meta-backward), for:

* ``loop``: the hand-written ``functional_call`` + ``autograd.grad(create_graph=True)`` loop
  (benchmarks/run.py's reference);
* ``loop_clones``: the same loop starting from ``p.clone()`` of every parameter, as higher 0.2.1
  (and ours, with ``copy_initial_weights=False``) starts: what those clones cost in place;
* ``floor``: the same math with no ``nn.Module`` at all (``F.linear``/``F.relu`` on a list of
  tensors): what is left when every framework overhead is gone (the autograd graph and the
  kernels);
* ``ours``: ``innerloop_ctx(model, opt, copy_initial_weights=False)``, as users write it.

Every variant is first checked to compute the hand-written loop's meta-gradient (float64).
Timing: one thread, interleaved rounds in a random order, the median over rounds of the mean
per task; phases are timed with ``time.perf_counter`` around each (the sum of the phases is a
little above the whole task's time, which is timed separately without the clocks). Ours' "open"
includes freeing the previous task's fmodel, which happens when ``as (fmodel, diffopt)`` rebinds
the names; the hand-written loops free theirs between tasks, outside every phase.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
for path in (str(ROOT / "src"), str(ROOT)):  # measure this checkout's higher
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

import higher  # noqa: E402
from benchmarks.run import _progress  # noqa: E402
from benchmarks.workloads import WORKLOADS  # noqa: E402

PHASES = ("open", "support forward", "inner step", "query forward", "meta-backward")
VARIANTS = ("loop", "loop_clones", "floor", "ours")
LABELS = {
    "loop": "hand-written loop (functional_call)",
    "loop_clones": "hand-written loop + time-0 clones",
    "floor": "no nn.Module (F.linear on tensors)",
    "ours": "ours (innerloop_ctx)",
}
#: A task's phases, timed: ``clock(phase_index)`` is called after each phase (a no-op when the
#: whole task is timed).
Task = Callable[[int, Callable[[int], None]], None]


def _plain_forward(model: nn.Sequential) -> Callable[[list[Tensor], Tensor], Tensor]:
    """``model``'s forward as plain functions of a parameter list (Linear, ReLU and Tanh layers)."""
    layers: list[tuple[str, int]] = []
    index = 0
    for module in model:
        if isinstance(module, nn.Linear):
            layers.append(("linear", index))
            index += 2 if module.bias is not None else 1
        elif isinstance(module, (nn.ReLU, nn.Tanh)):
            layers.append(("relu" if isinstance(module, nn.ReLU) else "tanh", -1))
        else:
            raise ValueError(f"the floor variant runs Linear/ReLU/Tanh layers only, not {type(module).__name__}")

    def forward(params: list[Tensor], x: Tensor) -> Tensor:
        for kind, i in layers:
            if kind == "linear":
                x = F.linear(x, params[i], params[i + 1])
            else:
                x = F.relu(x) if kind == "relu" else torch.tanh(x)
        return x

    return forward


def build(variant: str, model: nn.Module, data: tuple[Tensor, ...], lr: float, tasks: int, steps: int = 1) -> Task:
    """One task of ``variant``: ``steps`` support steps of SGD at ``lr``, the query loss over
    ``tasks``, backward (the support phases add up over the steps)."""
    support_x, support_y, query_x, query_y = data
    loss_fn = F.mse_loss
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    if variant == "ours":
        opt = torch.optim.SGD(model.parameters(), lr=lr)

        def ours(t: int, clock: Callable[[int], None]) -> None:
            with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
                clock(0)
                for _ in range(steps):
                    loss = loss_fn(fmodel(support_x[t]), support_y[t])
                    clock(1)
                    diffopt.step(loss)
                    clock(2)
                query_loss = loss_fn(fmodel(query_x[t]), query_y[t]) / tasks
                clock(3)
                query_loss.backward()
                clock(4)

        return ours
    if variant == "floor":
        forward = _plain_forward(model)  # type: ignore[arg-type]
    else:

        def forward(fast: list[Tensor], x: Tensor) -> Tensor:
            return functional_call(model, dict(zip(names, fast)), (x,))

    clones = variant == "loop_clones"

    def hand_written(t: int, clock: Callable[[int], None]) -> None:
        fast = [p.clone() for p in params] if clones else params
        clock(0)
        for _ in range(steps):
            loss = loss_fn(forward(fast, support_x[t]), support_y[t])
            clock(1)
            grads = torch.autograd.grad(loss, fast, create_graph=True)
            fast = [p - lr * g for p, g in zip(fast, grads)]
            clock(2)
        query_loss = loss_fn(forward(fast, query_x[t]), query_y[t]) / tasks
        clock(3)
        query_loss.backward()
        clock(4)

    return hand_written


def _no_clock(phase: int) -> None:
    pass


def meta_gradient(variant: str, workload_name: str, dtype: torch.dtype) -> list[Tensor]:
    workload = WORKLOADS[workload_name]
    torch.manual_seed(0)
    model = workload.make_model().to(dtype)
    data = tuple(d.to(dtype) for d in workload.make_data(torch.Generator().manual_seed(1)))
    task = build(variant, model, data, workload.lr["sgd"], workload.tasks, workload.inner_steps)
    for t in range(workload.tasks):
        task(t, _no_clock)
    return [p.grad for p in model.parameters()]  # type: ignore[misc]


def check(workload_name: str) -> dict[str, float]:
    """The largest relative difference of each variant's float64 meta-gradient from the loop's."""
    reference = meta_gradient("loop", workload_name, torch.float64)
    scale = max(float(g.abs().max()) for g in reference)
    differences = {}
    for variant in VARIANTS:
        grads = reference if variant == "loop" else meta_gradient(variant, workload_name, torch.float64)
        differences[variant] = max(float((a - b).abs().max()) for a, b in zip(grads, reference)) / scale
    return differences


class _PhaseClock:
    """Adds the time since the previous call to the phase just ended."""

    def __init__(self) -> None:
        self.sums = [0.0] * len(PHASES)
        self.last = 0.0

    def __call__(self, phase: int) -> None:
        now = time.perf_counter()
        self.sums[phase] += now - self.last
        self.last = now


def measure(workload_name: str, rounds: int, seed: int = 0, progress: bool = True) -> dict[str, dict[str, float]]:
    """Median µs per task of each variant: the whole task, and each phase."""
    workload = WORKLOADS[workload_name]
    data = workload.make_data(torch.Generator().manual_seed(1))
    tasks = workload.tasks
    runs = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        model = workload.make_model()
        runs[variant] = (model, build(variant, model, data, workload.lr["sgd"], tasks, workload.inner_steps))
    whole: dict[str, list[float]] = {v: [] for v in VARIANTS}
    phases: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    shuffle = random.Random(seed).shuffle
    counter = time.perf_counter
    for round_ in _progress(range(rounds + 1), rounds + 1, f"{workload_name} rounds", progress):  # 0 warms up
        shuffle(order)
        for variant in order:
            model, task = runs[variant]
            model.zero_grad(set_to_none=True)
            start = counter()
            for t in range(tasks):
                task(t, _no_clock)
            elapsed = counter() - start
            clock = _PhaseClock()
            for t in range(tasks):
                clock.last = counter()
                task(t, clock)
            if round_:
                whole[variant].append(elapsed / tasks * 1e6)
                phases[variant].append([s / tasks * 1e6 for s in clock.sums])
    return {
        variant: {
            "task": statistics.median(whole[variant]),
            **{name: statistics.median(r[i] for r in phases[variant]) for i, name in enumerate(PHASES)},
        }
        for variant in VARIANTS
    }


def table(results: dict[str, dict[str, float]]) -> str:
    loop = results["loop"]["task"]
    head = "| variant | µs per task | ratio to loop | " + " | ".join(PHASES) + " |"
    lines = [head, "|---|" + "---:|" * (2 + len(PHASES))]
    for variant in VARIANTS:
        r = results[variant]
        cells = [f"{r['task']:.0f}", f"{r['task'] / loop:.2f}x", *(f"{r[p]:.0f}" for p in PHASES)]
        lines.append(f"| {LABELS[variant]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="sine1", choices=["sine1", "sine", "deep"])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds of every variant (default 15)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    torch.set_num_threads(1)
    differences = check(args.workload)
    wrong = {v: d for v, d in differences.items() if not d <= 1e-10}
    if wrong:
        print(f"error: meta-gradients differ from the hand-written loop's (float64): {wrong}", file=sys.stderr)
        return 1
    results = measure(args.workload, args.rounds, progress=not (args.quiet or args.json))
    load = os.getloadavg()[0]
    if args.json:
        print(json.dumps({"workload": args.workload, "load_average": load, "check": differences, "us": results}))
    else:
        print(f"{args.workload}, SGD, one thread, {args.rounds} rounds, load average {load:.2f}")
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
