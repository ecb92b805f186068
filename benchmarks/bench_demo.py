"""Time the demo's meta-training iteration (MAML, sinusoid, the paper's setup) per thread count.

Run: python benchmarks/bench_demo.py [--iterations 300] [--threads 1 2]

Each thread count runs in its own process (torch's thread pool is set once per process) and
reports the median over 3 repetitions of the time per meta-training iteration of
``higher.algorithms.maml_step`` with 25 tasks, K=10, one inner SGD step. The chosen default
``--threads 1`` of ``python -m higher demo`` and its default ``--iterations`` come from this.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(iterations: int, threads: int) -> float:
    import torch
    import torch.nn.functional as F

    from higher.algorithms import maml_step
    from higher.data import SinusoidTasks
    from higher.demos.sinusoid import sinusoid_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = sinusoid_model()
    sampler = SinusoidTasks(shots=10, seed=0)
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def run(n: int) -> None:
        for _ in range(n):
            meta_opt.zero_grad()
            maml_step(model, inner_opt, sampler.sample(25).tasks(), F.mse_loss)
            meta_opt.step()

    run(10)  # warm-up
    start = time.perf_counter()
    run(iterations)
    return (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.iterations, args.worker)))
        return
    print(f"cores: {os.cpu_count()}; {args.iterations} meta-iterations per measurement, median of 3")
    for threads in args.threads:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        times = []
        for _ in range(3):
            out = subprocess.run(
                [sys.executable, __file__, "--iterations", str(args.iterations), "--worker", str(threads)],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            ).stdout
            times.append(json.loads(out))
        per_iteration = statistics.median(times)
        print(
            f"threads={threads}: {1000 * per_iteration:.1f} ms per iteration "
            f"(16000 iterations: {16000 * per_iteration / 60:.1f} min; 70000: {70000 * per_iteration / 60:.1f} min)"
        )


if __name__ == "__main__":
    main()
