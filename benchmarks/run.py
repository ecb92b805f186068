"""Benchmark: time per MAML meta-iteration of every implementation, side by side.

    python benchmarks/run.py                  # everything (sets up the competitors first)
    python benchmarks/run.py --workloads sine --optimizers sgd --rounds 10 --no-memory

For each workload and inner optimizer, one process builds every implementation on its own copy
of the same model and data, checks that they all compute the same meta-gradient (in float64),
then times them in interleaved rounds (a new random order each round, one thread) and reports
the median time per meta-iteration (inner loop + meta-loss + backward) and its ratio to the
hand-written ``functional_call`` + ``autograd.grad`` loop. Peak memory is measured in fresh
processes per implementation (the median of three): the peak resident set size over four
meta-iterations, and what they add to the peak after imports and setup. Writes a markdown table, a JSON
file and a PNG bar chart (needs matplotlib: ``pip install -e ".[bench]"``).

The competitors (higher 0.2.1, TorchOpt 0.7.3) are installed into ``.bench/`` on the first run
(see ``benchmarks/competitors.py``); ``--no-competitors`` skips them.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
for path in (str(ROOT / "src"), str(ROOT)):  # measure this checkout's higher
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

from benchmarks import competitors  # noqa: E402
from benchmarks.implementations import IMPLEMENTATIONS, Implementation, safe_sqrt  # noqa: E402
from benchmarks.workloads import WORKLOADS, Workload, tiny  # noqa: E402

OPTIMIZERS = ("sgd", "adam")
REFERENCE = "loop"  # ratios are to the hand-written loop
#: Relative tolerance of the float64 meta-gradient check.
CHECK_TOLERANCE = 1e-8
#: Known, documented differences in the math (checked with a looser tolerance, and reported).
#: Keys: (implementation, workload or "*", optimizer or "*").
KNOWN_DIFFERENCES = {
    ("original", "*", "adam"): (
        math.inf,  # reported, not checked: different math
        "higher 0.2.1's Adam adds eps before the bias correction, not torch.optim.Adam's math; entries "
        "whose gradient is near 0 (conv biases before BatchNorm) are very sensitive to that",
    ),
    ("torchopt", "*", "adam"): (
        math.inf,  # reported, not checked: different rounding, amplified
        "TorchOpt 0.7.3 computes Adam's bias corrections 1 - beta**count in float32 whatever the "
        "parameters' dtype (a Python float to the power of its int64 count tensor); 1 - 0.999 is then "
        "off by 1.3e-5",
    ),
    ("vmap_grad", "conv", "*"): (
        1e-1,
        "torch.func.grad under vmap gets BatchNorm's second-order terms wrong in torch 2.13: e.g. a "
        "nonzero meta-gradient for the conv biases, which BatchNorm makes exactly 0",
    ),
}


def _known_difference(impl: str, workload: str, optimizer: str) -> tuple[float, str]:
    for key in ((impl, workload, optimizer), (impl, workload, "*"), (impl, "*", optimizer)):
        if key in KNOWN_DIFFERENCES:
            return KNOWN_DIFFERENCES[key]
    return CHECK_TOLERANCE, ""


def _progress(iterable, total: int, description: str, enabled: bool):
    """tqdm if installed (the [bench] extra), else a plain counter on one line."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=description, leave=False, file=sys.stderr)
    except ImportError:

        def counted():
            for i, item in enumerate(iterable, 1):
                print(f"\r{description}: {i}/{total}", end="", file=sys.stderr, flush=True)
                yield item
            print("\r" + " " * (len(description) + 20) + "\r", end="", file=sys.stderr, flush=True)

        return counted()


def _data(workload: Workload, dtype: torch.dtype):
    data = workload.make_data(torch.Generator().manual_seed(0))
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in data)


def _model(workload: Workload, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return workload.make_model().to(dtype)


def _build(impl: Implementation, workload: Workload, optimizer: str, dtype: torch.dtype, model=None):
    model = copy.deepcopy(model if model is not None else _model(workload, dtype))
    return model, impl.build(workload, model, _data(workload, dtype), optimizer)


def _meta_gradient(impl: Implementation, workload: Workload, optimizer: str) -> torch.Tensor:
    model, meta_iteration = _build(impl, workload, optimizer, torch.float64)
    meta_iteration()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def check_meta_gradients(workload: Workload, optimizer: str, impls: list[Implementation]) -> list[str]:
    """Every implementation's float64 meta-gradient against the hand-written loop's; returns notes.

    The reference is the hand-written loop with, for Adam, a ``sqrt`` whose derivative at 0 is
    0 (the timed loop uses the plain ``sqrt``, whose meta-gradient is NaN as soon as a gradient
    entry is exactly 0, e.g. a dead ReLU unit). Entries that are not finite in an
    implementation are reported and left out of the comparison. Raises ``AssertionError`` on a
    mismatch.
    """
    with safe_sqrt():
        reference = _meta_gradient(IMPLEMENTATIONS[REFERENCE], workload, optimizer)
    assert torch.isfinite(reference).all(), "the reference meta-gradient is not finite"
    where = f"{workload.name}/{optimizer}"
    notes = []
    for impl in impls:
        ours = _meta_gradient(impl, workload, optimizer)
        finite = torch.isfinite(ours)
        bad = int((~finite).sum())
        if bad:
            notes.append(f"{where}: {impl.label}: {bad} of {ours.numel()} meta-gradient entries are NaN/inf")
        if not finite.any():
            continue
        scale = reference.abs().max().item()
        error = (ours[finite] - reference[finite]).abs().max().item() / scale
        tolerance, reason = _known_difference(impl.name, workload.name, optimizer)
        if error > tolerance:
            raise AssertionError(
                f"{where}: {impl.label}'s meta-gradient differs from the hand-written loop's by {error:.3g} "
                f"(relative to its largest entry), more than {tolerance:g}"
            )
        if reason:
            notes.append(f"{where}: {impl.label}: relative difference {error:.1e} ({reason})")
    return notes


def time_workload(
    workload: Workload, optimizer: str, impls: list[Implementation], rounds: int, warmup: int, progress: bool
) -> dict[str, list[float]]:
    """Seconds per meta-iteration of each implementation, ``rounds`` interleaved measurements each."""
    base = _model(workload, torch.float32)
    built = {impl.name: _build(impl, workload, optimizer, torch.float32, base) for impl in impls}
    times: dict[str, list[float]] = {impl.name: [] for impl in impls}
    order = [impl.name for impl in impls]
    shuffle = random.Random(0).shuffle
    for r in _progress(range(warmup + rounds), warmup + rounds, f"{workload.name}/{optimizer}", progress):
        shuffle(order)
        for name in order:
            model, meta_iteration = built[name]
            for p in model.parameters():
                p.grad = None
            gc.collect()
            start = time.perf_counter()
            meta_iteration()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
    return times


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux's ``ru_maxrss`` keeps the parent's high-water mark across fork and exec, so a child of
    a big benchmark process would report the parent's peak: the peak of the process's own memory
    image (``VmHWM``) is read instead where the system has it.
    """
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(spec: str) -> None:
    """Run in a fresh process: its peak RSS over four meta-iterations of one implementation.

    Prints ``before`` (the peak RSS after imports and setup) and ``peak`` (after the
    meta-iterations): ``peak - before`` is what the meta-iterations add.
    """
    workload_name, optimizer, impl_name, small = spec.split(":")
    workload = tiny(WORKLOADS[workload_name]) if small == "tiny" else WORKLOADS[workload_name]
    torch.set_num_threads(1)
    if competitors.installed():  # the same imports in every child
        competitors.load_original()
        competitors.load_torchopt()
    import higher  # noqa: F401

    # Lazy imports that only some implementations trigger (a torch.optim step imports
    # torch._dynamo, ~70 MiB; torch.func's transforms load their machinery) happen in every
    # child, so that the peaks compare.
    weight = torch.zeros(2, requires_grad=True)
    torch.optim.Adam([weight]).step()
    torch.func.vmap(torch.func.grad(lambda w: w.sin().sum()))(torch.zeros(2, 2))
    # Likewise the library code each implementation runs (foreach kernels, vmap's batching rules,
    # the competitors' own modules): every child first runs every implementation once on a tiny
    # version of the workload, so that all children have paged in the same code and the peaks
    # differ only by the memory the measured implementation uses.
    for other in IMPLEMENTATIONS.values():
        if other.competitor and not competitors.installed():
            continue
        _, warm_up = _build(other, tiny(workload), optimizer, torch.float32)
        warm_up()
    del warm_up
    model, meta_iteration = _build(IMPLEMENTATIONS[impl_name], workload, optimizer, torch.float32)
    gc.collect()
    before = _peak_rss_bytes()
    for _ in range(4):
        for p in model.parameters():
            p.grad = None
        meta_iteration()
    print(json.dumps({"before": before, "peak": _peak_rss_bytes()}))


def measure_memory(workload_name: str, optimizer: str, impl_name: str, small: bool, repeats: int = 3) -> dict[str, int]:
    """The median-peak run of ``repeats`` fresh processes (see :func:`memory_child`).

    glibc's malloc moves its mmap threshold with the allocation history, which made the peak of
    the same run vary by several MiB; a fixed threshold (64 KiB: every tensor above it is mapped
    on its own and returned to the system when freed) makes the peak that of the memory in use.
    """
    spec = f"{workload_name}:{optimizer}:{impl_name}:{'tiny' if small else 'full'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    runs = []
    for _ in range(repeats):
        result = subprocess.run(
            [sys.executable, __file__, "--memory-child", spec], capture_output=True, text=True, check=True, env=env
        )
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return sorted(runs, key=lambda run: run["peak"])[len(runs) // 2]


def _machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, 1 thread (torch.set_num_threads(1)), torch {torch.__version__}, Python {platform.python_version()}"


def _table(results: list[dict]) -> str:
    lines = [
        "| workload | optimizer | implementation | mode | median ms | ratio to hand-written loop | ratio to hand-written vmap | peak RSS MiB | added by the meta-iterations MiB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        medians = result["median_ms"]
        loop = medians.get(REFERENCE)
        vmap = medians.get("vmap")
        for name, ms in medians.items():
            impl = IMPLEMENTATIONS[name]
            to_loop = f"{ms / loop:.2f}x" if loop else ""
            to_vmap = f"{ms / vmap:.2f}x" if vmap and impl.batched else ""
            memory = result["memory"].get(name)
            peak = f"{memory['peak'] / 2**20:.1f}" if memory else ""
            over = f"{(memory['peak'] - memory['before']) / 2**20:.1f}" if memory else ""
            lines.append(
                f"| {result['workload']} | {result['optimizer']} | {impl.label} | "
                f"{'batched' if impl.batched else 'per task'} | {ms:.2f} | {to_loop} | {to_vmap} | {peak} | {over} |"
            )
    return "\n".join(lines)


def _summary(results: list[dict]) -> str:
    """Two compact tables: time as a ratio to the hand-written loop, and memory."""
    names = [name for name in IMPLEMENTATIONS if any(name in r["median_ms"] for r in results)]
    header = "| workload | inner optimizer | " + " | ".join(IMPLEMENTATIONS[n].label for n in names) + " |"
    rule = "|---|---|" + "---:|" * len(names)
    times, memory = [header, rule], [header, rule]
    for r in results:
        medians, row_t, row_m = r["median_ms"], [], []
        for name in names:
            ms = medians.get(name)
            if ms is None:
                row_t.append("")
            elif name == REFERENCE:
                row_t.append(f"{ms:.1f} ms")
            else:
                cell = f"{ms / medians[REFERENCE]:.2f}x" if REFERENCE in medians else f"{ms:.1f} ms"
                if IMPLEMENTATIONS[name].batched and name != "vmap" and "vmap" in medians:
                    cell += f" ({ms / medians['vmap']:.2f}x vmap)"
                row_t.append(cell)
            m = r["memory"].get(name)
            row_m.append(f"{m['peak'] / 2**20:.1f} (+{(m['peak'] - m['before']) / 2**20:.1f})" if m else "")
        times.append(f"| {r['workload']} | {r['optimizer']} | " + " | ".join(row_t) + " |")
        memory.append(f"| {r['workload']} | {r['optimizer']} | " + " | ".join(row_m) + " |")
    return (
        "Time per meta-iteration: the hand-written loop's median, the others as a ratio to it\n\n"
        + "\n".join(times)
        + "\n\nPeak RSS of a fresh process in MiB (and what the meta-iterations add to it)\n\n"
        + "\n".join(memory)
    )


def plot(results: list[dict], path: Path) -> bool:
    """A bar chart of the ratios to the hand-written loop; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [name for name in IMPLEMENTATIONS if any(name in r["median_ms"] for r in results)]
    groups = [f"{r['workload']}\n{r['optimizer']}" for r in results]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(9, 4), dpi=100)
    colors = {
        "loop": "#9e9e9e",
        "original": "#e6a04e",
        "torchopt": "#8fc98f",
        "ours": "#1f4e9c",
        "vmap": "#cfcfcf",
        "vmap_grad": "#e3e3e3",
        "ours_batched": "#6fa8dc",
    }
    for i, name in enumerate(names):
        xs, ys = [], []
        for g, r in enumerate(results):
            if name in r["median_ms"] and REFERENCE in r["median_ms"]:
                xs.append(g - 0.4 + width * (i + 0.5))
                ys.append(r["median_ms"][name] / r["median_ms"][REFERENCE])
        impl = IMPLEMENTATIONS[name]
        ax.bar(xs, ys, width, label=impl.label, color=colors.get(name), edgecolor="black", linewidth=0.4)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("time / hand-written loop\n(lower is faster)")
    ax.set_title("Time per MAML meta-iteration (median), CPU, 1 thread", fontsize=10, pad=30)
    ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.set_ylim(0, max(1.5, ax.get_ylim()[1]))
    ax.grid(axis="y", linewidth=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated: sgd, adam")
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS), help=", ".join(IMPLEMENTATIONS))
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--tiny", action="store_true", help="2 tasks, 2 steps: a smoke test in seconds")
    parser.add_argument("--no-competitors", action="store_true", help="skip higher 0.2.1 and TorchOpt")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--memory-repeats", type=int, default=3, help="processes per implementation (median)")
    parser.add_argument("--no-check", action="store_true", help="skip the meta-gradient check")
    parser.add_argument("--setup", action="store_true", help="only install the competitors (and JAX) into .bench/")
    parser.add_argument("--output", type=Path, default=ROOT / ".bench", help="folder for results (default .bench/)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default OUTPUT/benchmark.png)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_child:
        memory_child(args.memory_child)
        return 0
    torch.set_num_threads(1)
    wanted = args.implementations.split(",")
    impls = [IMPLEMENTATIONS[name] for name in wanted if not (args.no_competitors and IMPLEMENTATIONS[name].competitor)]
    if any(impl.competitor for impl in impls) or args.setup:
        competitors.setup(jax=args.setup)  # JAX (for benchmarks/compiled.py) only with --setup
        if args.setup:
            return 0
        competitors.load_original()
        competitors.load_torchopt()
    import higher

    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {_machine()}")
    print(f"higher under test: {higher.__file__}")
    results, notes = [], []
    for workload_name in args.workloads.split(","):
        workload = WORKLOADS[workload_name]
        if args.tiny:
            workload = tiny(workload)
        for optimizer in args.optimizers.split(","):
            if not args.no_check:
                notes += check_meta_gradients(workload, optimizer, impls)
            times = time_workload(workload, optimizer, impls, args.rounds, args.warmup, not args.quiet)
            memory = {}
            if not args.no_memory:
                for impl in _progress(impls, len(impls), f"{workload_name}/{optimizer} memory", not args.quiet):
                    memory[impl.name] = measure_memory(
                        workload_name, optimizer, impl.name, args.tiny, args.memory_repeats
                    )
            result = {
                "workload": workload.name,
                "description": workload.description,
                "optimizer": optimizer,
                "median_ms": {name: 1000 * statistics.median(ts) for name, ts in times.items()},
                "times_ms": {name: [1000 * t for t in ts] for name, ts in times.items()},
                "memory": memory,
            }
            results.append(result)
            print(_table([result]).split("\n", 2)[2] if len(results) > 1 else _table([result]), flush=True)
    table = _table(results)
    print()
    print(table)
    for note in notes:
        print("note:", note)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(
        json.dumps({"machine": _machine(), "rounds": args.rounds, "results": results, "notes": notes}, indent=1)
    )
    load = (
        f"{load_at_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end" if hasattr(os, "getloadavg") else "?"
    )
    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.output / "results.md").write_text(
        f"Machine: {_machine()}; 1-minute load average {load}.\nCommand: `{command.strip()}`\n\n"
        f"{_summary(results)}\n\nAll measurements\n\n{table}\n\n" + "".join(f"- {note}\n" for note in notes)
    )
    png = args.plot or args.output / "benchmark.png"
    print(f"wrote {args.output / 'results.md'}, {args.output / 'results.json'}", end="")
    print(f", {png}" if plot(results, png) else " (no chart: pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
