"""Benchmark: MAML meta-iterations per second on 1 and 2 ranks (torch.distributed, gloo, CPU).

    python benchmarks/distributed.py                       # sine, deep, conv; per task and batched
    python benchmarks/distributed.py --workloads deep --rounds 5 --json out.json

Two processes (one thread each) start once and form a gloo process group. For each workload of
``benchmarks/workloads.py`` (inner optimizer SGD) and each mode (per task: one ``innerloop_ctx``
and one ``backward`` per task, ``no_sync()`` on all but a rank's last task; batched:
``innerloop_ctx(..., tasks=T)``), these variants are timed in interleaved rounds, so that they
see the same machine load:

* ``1 rank``: rank 0 runs the whole meta-batch on the plain model (rank 1 waits at a barrier);
* ``2 ranks``: ``DistributedDataParallel(model)`` in ``innerloop_ctx``, each rank runs its share
  (``higher.distributed.split_tasks``), one all-reduce per meta-iteration;
* ``2 ranks, no all-reduce``: each rank runs its share on the plain model, nothing is
  communicated (the speed-up that perfect communication would give);
* ``2 ranks, DDP forward``: the DDP wrapper itself patched (``higher.patch.monkeypatch`` of
  the DDP object), so DDP's own ``forward`` and reducer run at every fmodel call: what a user
  got before ``higher.distributed`` (per task only).

Before timing, each variant's meta-gradient (float64, one meta-iteration) is checked against the
1-rank one. Reports the median wall-clock time per meta-iteration as meta-iterations per second
and the speed-up over 1 rank, and the bytes each rank all-reduces per meta-iteration (against one
model's gradients). Also the CPU-time speed-up: the 1-rank CPU time per meta-iteration over the
busiest rank's CPU time (process time, all threads): the speed-up the work division allows when
each rank has a core of its own, including every overhead that costs CPU (hooks, flattening,
the transport) but not the time spent waiting for the other rank. On a machine shared with other
jobs the wall-clock speed-up is limited by the cores the ranks actually get; the load average
is printed before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
for path in (str(ROOT / "src"), str(ROOT)):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import vmap  # noqa: E402

import higher  # noqa: E402
from benchmarks.workloads import WORKLOADS, Workload  # noqa: E402
from higher import distributed as hd  # noqa: E402

WORLD = 2
VARIANTS = ("1 rank", "2 ranks", "2 ranks, no all-reduce", "2 ranks, DDP forward")


def _meta_iteration(
    workload: Workload, net: nn.Module, model: nn.Module, data: tuple, tasks: range, world: int, mode: str, old: bool
) -> Callable[[], None]:
    """One MAML meta-iteration over ``tasks`` (this rank's share), the meta-loss weighted for the world."""
    sx, sy, qx, qy = (t[tasks.start : tasks.stop] for t in data)
    inner_opt = torch.optim.SGD(model.parameters(), lr=workload.lr["sgd"])
    weight = hd.task_weight(workload.tasks, world)
    loss_fn, steps, n = workload.loss, workload.inner_steps, len(tasks)
    ddp = hd.is_ddp(net)
    task_losses = vmap(loss_fn)

    def ctx(**kwargs: Any) -> Any:
        if old:  # the DDP object itself patched: DDP's forward runs at every fmodel call
            fmodel = higher.patch.monkeypatch(net, copy_initial_weights=False)
            diffopt = higher.get_diff_optim(inner_opt, list(net.parameters()), fmodel=fmodel)
            return contextlib.nullcontext((fmodel, diffopt))
        return higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False, **kwargs)

    def per_task() -> None:
        for k in range(n):
            sync = net.no_sync() if ddp and k < n - 1 else contextlib.nullcontext()
            with sync, ctx() as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss_fn(fmodel(sx[k]), sy[k]))
                (loss_fn(fmodel(qx[k]), qy[k]) * weight).backward()

    def batched() -> None:
        with ctx(tasks=n) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(task_losses(fmodel(sx), sy))
            (task_losses(fmodel(qx), qy).sum() * weight).backward()

    return per_task if mode == "per task" else batched


def _setup(
    workload: Workload, variant: str, mode: str, rank: int, dtype: torch.dtype
) -> tuple[Any, nn.Module, Any] | None:
    """This rank's meta-iteration for ``variant`` (None: this rank only waits), the model, the DDP wrapper."""
    torch.manual_seed(0)
    model = workload.make_model().to(dtype)
    data = tuple(
        t.to(dtype) if t.is_floating_point() else t for t in workload.make_data(torch.Generator().manual_seed(0))
    )
    if variant == "1 rank":
        if rank != 0:
            return None
        return _meta_iteration(workload, model, model, data, range(workload.tasks), 1, mode, False), model, None
    tasks = hd.split_tasks(workload.tasks, rank, WORLD)
    if variant == "2 ranks, no all-reduce":
        return _meta_iteration(workload, model, model, data, tasks, WORLD, mode, False), model, None
    net = nn.parallel.DistributedDataParallel(model)
    old = variant == "2 ranks, DDP forward"
    return _meta_iteration(workload, net, model, data, tasks, WORLD, mode, old), model, net


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    results: dict[str, Any] = {}
    for name in args.workloads:
        workload = WORKLOADS[name]
        for mode in args.modes:
            variants = [v for v in VARIANTS if not (v == "2 ranks, DDP forward" and mode == "batched")]
            # 1. correctness: float64, one meta-iteration, every variant against 1 rank
            reference = None
            errors = {}
            for variant in variants:
                built = _setup(workload, variant, mode, rank, torch.float64)
                grads = None
                if built is not None:
                    step, model, _ = built
                    step()
                    grads = torch.cat([g.flatten() for g in _grads(model)])
                    if variant == "2 ranks, no all-reduce":  # average by hand, to compare
                        dist.all_reduce(grads)
                        grads /= WORLD
                # rank 0 holds the reference; compare there
                if rank == 0:
                    if reference is None:
                        reference = grads
                    errors[variant] = ((grads - reference).abs().max() / reference.abs().max()).item()
                dist.barrier()
            # 2. timing, float32, interleaved rounds
            built = {v: _setup(workload, v, mode, rank, torch.float32) for v in variants}
            for b in built.values():  # warm up, and find how many iterations make ~--sample seconds
                dist.barrier()
                if b is not None:
                    b[0]()
            counts = {}
            for v, b in built.items():
                dist.barrier()
                start = time.perf_counter()
                if b is not None:
                    b[0]()
                dist.barrier()
                once = time.perf_counter() - start
                count = torch.tensor([max(1, int(args.sample / max(once, 1e-6)))])
                dist.broadcast(count, 0)
                counts[v] = int(count)
            times: dict[str, list[float]] = {v: [] for v in variants}
            cpu: dict[str, list[float]] = {v: [] for v in variants}
            stats_before = {}
            for round_index in range(args.rounds):
                order = variants if round_index % 2 == 0 else list(reversed(variants))
                for v in order:
                    b = built[v]
                    if v == "2 ranks" and round_index == 0 and b is not None:
                        stats_before = hd.sync_stats(b[2])
                    dist.barrier()
                    start, start_cpu = time.perf_counter(), time.process_time()
                    if b is not None:
                        for _ in range(counts[v]):
                            b[0]()
                    own_cpu = torch.tensor([(time.process_time() - start_cpu) / counts[v]], dtype=torch.float64)
                    dist.barrier()
                    times[v].append((time.perf_counter() - start) / counts[v])
                    dist.all_reduce(own_cpu, op=dist.ReduceOp.MAX)  # the busiest rank's CPU time
                    cpu[v].append(float(own_cpu))
            ddp_stats = hd.sync_stats(built["2 ranks"][2])
            iterations = ddp_stats["backwards"] - stats_before.get("backwards", 0)
            model_bytes = sum(p.numel() * p.element_size() for p in built["2 ranks"][1].parameters())
            net_stats = {
                "bytes_per_meta_iteration": (ddp_stats["bytes"] - stats_before.get("bytes", 0)) / max(iterations, 1),
                "all_reduces_per_meta_iteration": (ddp_stats["all_reduces"] - stats_before.get("all_reduces", 0))
                / max(iterations, 1),
                "model_gradient_bytes": model_bytes,
            }
            if rank == 0:
                results[f"{name}/{mode}"] = {
                    "workload": workload.description,
                    "median_s": {v: statistics.median(t) for v, t in times.items()},
                    "median_cpu_s": {v: statistics.median(t) for v, t in cpu.items()},
                    "samples_s": times,
                    "iterations_per_sample": counts,
                    "max_rel_grad_difference_float64": errors,
                    **net_stats,
                }
                print(_row(name, mode, results[f"{name}/{mode}"]), flush=True)
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))


def _row(name: str, mode: str, r: dict) -> str:
    m, c = r["median_s"], r["median_cpu_s"]
    one, one_cpu = m["1 rank"], c["1 rank"]
    cells = [f"{name}", mode, f"{1 / one:.1f}"]
    for v in VARIANTS[1:]:
        cells.append(f"{1 / m[v]:.1f} ({one / m[v]:.2f}x; CPU {one_cpu / c[v]:.2f}x)" if v in m else "-")
    cells.append(f"{r['bytes_per_meta_iteration']:.0f} / {r['model_gradient_bytes']}")
    return "| " + " | ".join(cells) + " |"


def task_curve(names: list[str], rounds: int) -> None:
    """One process: time per batched meta-iteration against the number of tasks in it.

    Shows how much of a batched meta-iteration does not shrink with fewer tasks (per-operation
    overhead), which bounds what splitting the tasks across ranks can gain.
    """
    torch.set_num_threads(1)
    for name in names:
        workload = WORKLOADS[name]
        counts = sorted({1, 2, max(1, workload.tasks // 2), workload.tasks - workload.tasks // 2, workload.tasks})
        steps = {}
        for n in counts:
            torch.manual_seed(0)
            model = workload.make_model()
            data = workload.make_data(torch.Generator().manual_seed(0))
            steps[n] = _meta_iteration(workload, model, model, data, range(n), 1, "batched", False)
            steps[n]()
        samples: dict[int, list[float]] = {n: [] for n in counts}
        for _ in range(rounds):
            for n in counts:
                start = time.perf_counter()
                for _ in range(5):
                    steps[n]()
                samples[n].append((time.perf_counter() - start) / 5)
        full = statistics.median(samples[workload.tasks])
        cells = ", ".join(
            f"{n} tasks {1e3 * statistics.median(samples[n]):.1f} ms ({statistics.median(samples[n]) / full:.2f})"
            for n in counts
        )
        print(f"{name} batched, one process: {cells}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--modes", nargs="+", default=["per task", "batched"], choices=["per task", "batched"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sample", type=float, default=0.4, help="seconds per timing sample (about)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument(
        "--task-curve", action="store_true", help="only time batched meta-iterations against the number of tasks"
    )
    args = parser.parse_args(argv)
    if args.task_curve:
        print(f"load average before: {os.getloadavg()}")
        task_curve(args.workloads, args.rounds)
        print(f"load average after: {os.getloadavg()}")
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = args.json or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"higher-distributed-{os.getpid()}.json")
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores, 1 thread per rank; load average before: {os.getloadavg()}"
    )
    print(
        "| workload | mode | 1 rank (it/s) | 2 ranks (it/s, speed-up) | 2 ranks, no all-reduce | 2 ranks, DDP forward | bytes all-reduced per it / model |"
    )
    print("|---|---|---|---|---|---|---|")
    torch.multiprocessing.spawn(_worker, args=(port, args, out), nprocs=WORLD, join=True)
    print(f"load average after: {os.getloadavg()}")
    results = json.loads(Path(out).read_text())
    for key, r in results.items():
        print(
            f"{key}: max relative difference of the float64 meta-gradient to 1 rank: {r['max_rel_grad_difference_float64']}"
        )


if __name__ == "__main__":
    main()
