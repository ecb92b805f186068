"""Peak memory of a long second-order unroll: ours against a hand-written ``functional_call`` loop.

One unroll is ``--steps`` (default 200) differentiable SGD steps (``create_graph=True``) of an MLP
with about 74k parameters (32-256-256-1, ReLU) on a fixed regression batch, then the gradient of
the final loss with respect to the initial weights (``meta_loss.backward()`` to
``model.parameters()``). Everything the backward pass needs is kept in memory, so the peak grows
with the number of steps: what each implementation keeps per step is what this measures.

Each implementation runs in a fresh process (the median of ``--repeats`` processes is reported):
the process first runs every implementation once on a 3-step unroll, so that all processes have
paged in the same library code, then records its peak resident set size (``VmHWM``), runs the
long unroll, and reports the peak's growth. glibc's mmap threshold is fixed at 64 KiB (as in
``benchmarks/run.py``) so that freed tensors go back to the system and the peak is that of the
memory in use.

    python benchmarks/long_unroll.py                       # 200 steps, float32, 3 processes each
    python benchmarks/long_unroll.py --steps 50 --repeats 1

Implementations:
    loop:     ``torch.func.functional_call`` + ``torch.autograd.grad(create_graph=True)`` + ``p - lr * g``
    ours:     ``higher.innerloop_ctx(model, SGD, copy_initial_weights=False)``, ``diffopt.step(loss)``
    original: higher 0.2.1 (only if ``benchmarks/run.py --setup`` installed it into ``.bench/``)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

ROOT = Path(__file__).resolve().parent.parent
LR = 0.01


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(64, 32, generator=generator), torch.randn(64, 1, generator=generator)


def _loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target)


def run_loop(model: nn.Module, steps: int) -> torch.Tensor:
    x, y = _data()
    fast = dict(model.named_parameters())
    for _ in range(steps):
        loss = _loss(functional_call(model, fast, (x,)), y)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {name: p - LR * g for (name, p), g in zip(fast.items(), grads)}
    meta_loss = _loss(functional_call(model, fast, (x,)), y)
    meta_loss.backward()
    return meta_loss.detach()


def run_ours(model: nn.Module, steps: int) -> torch.Tensor:
    import higher

    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(_loss(fmodel(x), y))
        meta_loss = _loss(fmodel(x), y)
    meta_loss.backward()
    return meta_loss.detach()


def run_original(model: nn.Module, steps: int) -> torch.Tensor:
    sys.path.insert(0, str(ROOT))
    from benchmarks import competitors

    original = competitors.load_original()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with original.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(_loss(fmodel(x), y))
        meta_loss = _loss(fmodel(x), y)
    meta_loss.backward()
    return meta_loss.detach()


RUNS = {"loop": run_loop, "ours": run_ours, "original": run_original}


def _original_available() -> bool:
    try:
        sys.path.insert(0, str(ROOT))
        from benchmarks import competitors

        return competitors.installed()
    except Exception:
        return False


def _peak_rss_bytes() -> int:
    """The process's peak resident set size (``VmHWM``, not inherited across fork/exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(name: str, steps: int, implementations: list[str]) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "src"))
    import higher  # noqa: F401

    for other in implementations:  # page in every implementation's code, in every process
        RUNS[other](_model(), 3)
    model = _model()
    gc.collect()
    before = _peak_rss_bytes()
    meta_loss = RUNS[name](model, steps)
    print(json.dumps({"before": before, "peak": _peak_rss_bytes(), "meta_loss": float(meta_loss)}))


def measure(name: str, steps: int, implementations: list[str], repeats: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    runs = []
    for _ in range(repeats):
        command = [sys.executable, __file__, "--child", name, "--steps", str(steps)]
        command += ["--implementations", ",".join(implementations)]
        result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    runs.sort(key=lambda run: run["peak"] - run["before"])
    return runs[len(runs) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--implementations", default=None, help="comma-separated: loop, ours, original")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.implementations:
        implementations = args.implementations.split(",")
    else:
        implementations = ["loop", "ours"] + (["original"] if _original_available() else [])
    if args.child:
        child(args.child, args.steps, implementations)
        return 0
    params = sum(p.numel() for p in _model().parameters())
    print(f"{args.steps}-step second-order SGD unroll, MLP 32-256-256-1 ({params} parameters), float32, one thread;")
    print(f"median of {args.repeats} fresh processes; load average {os.getloadavg()[0]:.2f}")
    print("| implementation | peak RSS MiB | added by the unroll MiB | meta-loss |")
    print("|---|---:|---:|---:|")
    for name in implementations:
        run = measure(name, args.steps, implementations, args.repeats)
        mib = 1024 * 1024
        added = (run["peak"] - run["before"]) / mib
        print(f"| {name} | {run['peak'] / mib:.1f} | {added:.1f} | {run['meta_loss']:.6g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
