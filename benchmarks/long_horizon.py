"""Long horizons: memory and time of full, checkpointed and forward-mode hypergradients against T.

Workload: the deep MLP of ``benchmarks/workloads.py`` (16-layer tanh MLP, width 64, float32), one
sine task (10 support points, full batch every step), SGD with momentum 0.9, lr 0.01, T steps;
outer loss on 10 query points; meta-gradients with respect to the initial weights and
hypergradients with respect to ``lr`` and ``momentum`` (``override`` tensors).

Memory is the peak resident set size (``ru_maxrss``) of a fresh process per (method, T) point,
minus the peak after a 2-step warm-up of the same method in that process (which pages in the
library code and allocator pools, so the difference is the unroll's own memory). torch's CPU
allocator keeps no peak counter (``torch.cuda.max_memory_allocated`` has no CPU twin), and
a profiler-based count misses the autograd graph's own nodes; peak RSS counts everything.

    python benchmarks/long_horizon.py                       # table + docs/long-horizon.png
    python benchmarks/long_horizon.py --steps 10 100 1000   # a subset
    python benchmarks/long_horizon.py --crossover           # forward vs reverse against #hyperparameters
    python benchmarks/long_horizon.py --timing 1000         # time ratio, alternating rounds in one process
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

import higher  # noqa: E402
from benchmarks.workloads import WORKLOADS, deep_mlp  # noqa: E402

METHODS = ("full", "checkpointed", "forward")
OTHERS = ("truncated", "first_order")  # approximate methods, for the docs' table


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _problem():
    g = torch.Generator().manual_seed(0)
    sx, sy, qx, qy = (t[0] for t in WORKLOADS["deep"].make_data(g))
    torch.manual_seed(0)
    return deep_mlp(), sx, sy, qx, qy


def run(method: str, steps: int, hypers: int = 2, exact: list[float] | None = None) -> float:
    """One measurement; returns seconds (and appends d/d(lr, momentum) to ``exact`` if given)."""
    model, sx, sy, qx, qy = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    if method == "forward":
        h = [torch.tensor(0.01), torch.tensor(0.9)] if hypers == 2 else [torch.full((hypers,), 0.01)]
        n = len(list(model.parameters()))

        def override(hh):
            if hypers == 2:
                return {"lr": [hh[0]], "momentum": [hh[1]]}
            return {"lr": [higher.PerParameter([hh[0][i % hypers] for i in range(n)])]}

        result = higher.forward_hypergradient(
            model,
            opt,
            h,
            lambda fm, t, hh: (fm(sx) - sy).pow(2).mean(),
            lambda fm, hh: (fm(qx) - qy).pow(2).mean(),
            steps,
            override=override,
        )
        if exact is not None:
            exact.extend(float(g) for g in result.hypergradients)
        return time.perf_counter() - start
    if hypers == 2:
        lr, mom = torch.tensor(0.01, requires_grad=True), torch.tensor(0.9, requires_grad=True)
        override = {"lr": [lr], "momentum": [mom]}
    else:
        h = torch.full((hypers,), 0.01, requires_grad=True)
        n = len(list(model.parameters()))
        override = {"lr": [higher.PerParameter([h[i % hypers] for i in range(n)])]}
    with higher.innerloop_ctx(
        model, opt, copy_initial_weights=False, override=override, first_order=method == "first_order"
    ) as (fm, do):
        if method == "checkpointed":
            higher.checkpointed_unroll(fm, do, lambda f, t: F.mse_loss(f(sx), sy), steps)
        else:
            window = higher.checkpointing.default_every(steps)
            for t in range(steps):
                if method == "truncated" and t and t % window == 0:
                    fm.detach_()  # backpropagate through the last window only
                    do.detach_()
                do.step(F.mse_loss(fm(sx), sy))
        F.mse_loss(fm(qx), qy).backward()
    if method in ("full", "checkpointed", "truncated", "first_order") and hypers == 2 and exact is not None:
        exact.extend([lr.grad.item(), mom.grad.item()])
    return time.perf_counter() - start


def child(method: str, steps: int, hypers: int) -> None:
    torch.set_num_threads(1)
    run(method, 2, hypers)  # warm-up: library pages, allocator pools
    baseline = _rss_mib()
    seconds = run(method, steps, hypers)
    print(
        json.dumps(
            {
                "method": method,
                "steps": steps,
                "hypers": hypers,
                "seconds": seconds,
                "peak_mib": _rss_mib(),
                "baseline_mib": baseline,
                "unroll_mib": _rss_mib() - baseline,
            }
        )
    )


def measure(method: str, steps: int, hypers: int = 2) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, str(steps), str(hypers)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 30, 100, 300, 1000, 2000])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + OTHERS)
    parser.add_argument("--exactness", type=int, metavar="T", help="float64 d/d(lr, momentum) of every method at T")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "long-horizon.png"))
    parser.add_argument("--crossover", action="store_true", help="forward vs reverse time against #hyperparameters")
    parser.add_argument("--json", help="write all points to this file")
    parser.add_argument("--timing", type=int, metavar="T", help="time full vs checkpointed at T steps in this process")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds for --timing")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    print(f"load average before: {os.getloadavg()}", flush=True)
    points = []
    if args.exactness:
        torch.set_num_threads(1)
        torch.set_default_dtype(torch.float64)
        values = {}
        for method in ("full", "checkpointed", "forward", "truncated", "first_order"):
            values[method] = []
            run(method, args.exactness, exact=values[method])
        ref = values["full"]
        for method, (d_lr, d_mom) in values.items():
            err = max(abs(d_lr - ref[0]) / abs(ref[0]), abs(d_mom - ref[1]) / abs(ref[1]))
            print(
                f"T={args.exactness} {method:13s} d/dlr {d_lr: .10e}  d/dmomentum {d_mom: .10e}  max rel. error {err:.1e}"
            )
        return
    if args.timing:
        torch.set_num_threads(1)
        run("full", 2)
        run("checkpointed", 2)
        # CPU time of this (one-thread) process: wall time on a shared machine measures the load too.
        times: dict[str, list[float]] = {"full": [], "checkpointed": []}
        for _ in range(args.rounds):
            for method in times:
                cpu = time.process_time()
                wall = run(method, args.timing)
                times[method].append(time.process_time() - cpu)
                print(f"T={args.timing} {method:13s} cpu {times[method][-1]:7.2f} s  wall {wall:7.2f} s", flush=True)
        best = {m: min(v) for m, v in times.items()}
        ratios = [c / f for c, f in zip(times["checkpointed"], times["full"])]
        print(
            f"CPU time, min: full {best['full']:.2f} s, checkpointed {best['checkpointed']:.2f} s, "
            f"ratio of minima {best['checkpointed'] / best['full']:.2f}; per-round ratios "
            f"{', '.join(f'{r:.2f}' for r in ratios)}"
        )
        print(f"load average after: {os.getloadavg()}", flush=True)
        return
    if args.crossover:
        for hypers in (1, 2, 4, 8, 16):
            for method in ("reverse", "forward"):
                p = measure("full" if method == "reverse" else "forward", 100, hypers)
                p["method"] = method
                points.append(p)
                print(
                    f"T=100 hyper scalars={hypers:3d} {method:8s} {p['seconds']:7.2f} s  {p['unroll_mib']:8.1f} MiB",
                    flush=True,
                )
    else:
        for steps in args.steps:
            for method in args.methods:
                p = measure(method, steps)
                points.append(p)
                print(
                    f"T={steps:5d} {method:13s} {p['seconds']:8.2f} s  unroll {p['unroll_mib']:8.1f} MiB  "
                    f"(peak {p['peak_mib']:.1f}, baseline {p['baseline_mib']:.1f})",
                    flush=True,
                )
        if args.plot:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, axes = plt.subplots(1, 2, figsize=(10, 4))
            for method in args.methods:
                mine = [p for p in points if p["method"] == method]
                axes[0].plot([p["steps"] for p in mine], [max(p["unroll_mib"], 0.1) for p in mine], "o-", label=method)
                axes[1].plot([p["steps"] for p in mine], [p["seconds"] for p in mine], "o-", label=method)
            for ax, label in zip(axes, ("memory of the unroll (MiB, peak RSS - warm-up)", "seconds")):
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("inner steps T")
                ax.set_ylabel(label)
                ax.legend()
                ax.grid(True, which="both", alpha=0.3)
            fig.suptitle("deep MLP (16x64 tanh), SGD momentum, meta-gradient + d/d(lr, momentum); 1 thread")
            fig.tight_layout()
            fig.savefig(args.plot, dpi=100)
            print(f"wrote {args.plot}")
    print(f"load average after: {os.getloadavg()}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(points, indent=1))


if __name__ == "__main__":
    main()
