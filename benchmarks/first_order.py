"""First-order against second-order MAML: time per meta-iteration and peak memory.

Usage: python benchmarks/first_order.py [--rounds 30]

Two workloads (5 SGD inner steps, the meta-gradient of the query loss, summed over tasks):
sine (MLP 1-40-40-1, 25 tasks, 10+10 points) and deep (16-layer tanh MLP of width 64, 8 tasks,
32+32 points). Time: median over interleaved rounds in one process, 1 thread. Memory: the
largest autograd graph of one task at its meta-backward (see ``graph_memory_mib``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import higher

STEPS = 5


def _sine():
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    tasks = [(torch.rand(10, 1) * 10 - 5, torch.rand(10, 1) * 10 - 5) for _ in range(25)]
    return model, [(xs, torch.sin(xs), xq, torch.sin(xq)) for xs, xq in tasks], 0.01


def _deep():
    layers: list[nn.Module] = [nn.Linear(16, 64), nn.Tanh()]
    for _ in range(14):
        layers += [nn.Linear(64, 64), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(64, 1))
    tasks = [(torch.randn(32, 16), torch.randn(32, 1), torch.randn(32, 16), torch.randn(32, 1)) for _ in range(8)]
    return model, tasks, 0.01


WORKLOADS = {"sine": _sine, "deep": _deep}


def meta_iteration(model, tasks, lr, first_order):
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for xs, ys, xq, yq in tasks:
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, first_order=first_order) as (fmodel, diffopt):
            for _ in range(STEPS):
                diffopt.step(nn.functional.mse_loss(fmodel(xs), ys))
            nn.functional.mse_loss(fmodel(xq), yq).backward()


def graph_memory_mib(model, tasks, lr, first_order) -> float:
    """Largest memory held by one task's autograd graph when its meta-loss is backpropagated.

    Counts the tensors autograd saves for backward (activations, intermediate results of the
    inner gradients, fast weights), once per storage, via ``saved_tensors_hooks``. A task's graph
    is freed by its meta-backward, so this is the peak of the memory that the unroll adds.
    """
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    peak = 0
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for xs, ys, xq, yq in tasks:
        storages.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            with higher.innerloop_ctx(model, opt, copy_initial_weights=False, first_order=first_order) as (
                fmodel,
                diffopt,
            ):
                for _ in range(STEPS):
                    diffopt.step(nn.functional.mse_loss(fmodel(xs), ys))
                meta_loss = nn.functional.mse_loss(fmodel(xq), yq)
        peak = max(peak, sum(storages.values()))
        meta_loss.backward()
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {STEPS} inner SGD steps, median of {args.rounds} interleaved rounds")
    print(
        f"{'workload':<8} {'second-order ms':>16} {'first-order ms':>15} {'time ratio':>11} {'second-order graph MiB':>23} {'first-order graph MiB':>22}"
    )
    for name, make in WORKLOADS.items():
        torch.manual_seed(0)
        model, tasks, lr = make()
        timings: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for first_order in (False, True):
                start = time.perf_counter()
                meta_iteration(model, tasks, lr, first_order)
                timings[first_order].append((time.perf_counter() - start) * 1e3)
        second, first = statistics.median(timings[False]), statistics.median(timings[True])
        memory = {mode: graph_memory_mib(model, tasks, lr, mode) for mode in (False, True)}
        print(
            f"{name:<8} {second:>16.2f} {first:>15.2f} {first / second:>10.2f}x {memory[False]:>23.3f} {memory[True]:>22.3f}"
        )


if __name__ == "__main__":
    main()
