"""What every demo shares: the progress display, statistics, tables, plotting and JSON output.

Nothing here is specific to an experiment; each experiment module (:mod:`higher.demos.sinusoid`,
:mod:`higher.demos.digits`, :mod:`higher.demos.hyper`) builds its model, training, evaluation
and plot from these pieces and from the public API.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = [
    "DemoError",
    "TEST_SEED",
    "Progress",
    "mean_interval",
    "Summary",
    "summarize",
    "format_table",
    "table_json",
    "pyplot",
    "save_figure",
    "steps_label",
    "to_jsonable",
    "json_line",
    "peak_rss_mib",
]

TEST_SEED = 2017  # the test tasks are the same whatever --seed is, so that tables compare


class DemoError(Exception):
    """A bad option or environment: the command line prints ``higher: error: ...`` and exits with 2."""


class Progress:
    """A tqdm progress bar (iterations per second and the running meta-loss), or plain lines.

    Without tqdm, or with ``enabled=False`` (``--no-progress``), it prints a line every 10% of the
    iterations instead, with the elapsed time and the iterations per second. ``quiet=True``
    prints nothing at all (used for the JSON output's timings only). The bar goes to stderr (tqdm's
    default), so that stdout holds the results.
    """

    def __init__(self, total: int, enabled: bool, label: str, quiet: bool = False) -> None:
        self.total, self.enabled, self.label, self.quiet = total, enabled, label, quiet
        self.running: float | None = None
        self.bar: Any = None
        self.start = time.perf_counter()
        self.next_line = 0
        if enabled and not quiet:
            try:
                from tqdm import tqdm
            except ImportError:
                print(f"{label}: {total} iterations (install tqdm, or 'higher[demo]', for a progress bar)")
            else:
                self.bar = tqdm(total=total, desc=label, unit="it", dynamic_ncols=True, mininterval=0.5)

    def update(self, iteration: int, loss: float) -> None:
        """Record the loss of iteration ``iteration`` (counted from 1)."""
        self.running = loss if self.running is None else 0.98 * self.running + 0.02 * loss
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.update(1)
            if iteration % 20 == 0 or iteration == self.total:
                self.bar.set_postfix(meta_loss=f"{self.running:.3f}", refresh=False)
        elif iteration >= self.next_line or iteration == self.total:
            elapsed = time.perf_counter() - self.start
            rate = iteration / elapsed if elapsed > 0 else float("inf")
            print(
                f"{self.label}: {iteration}/{self.total}  running meta-loss {self.running:.3f}  "
                f"{elapsed:.0f}s  {rate:.0f} it/s",
                flush=True,
            )
            self.next_line = iteration + max(1, self.total // 10)

    def close(self) -> float:
        """Close the bar; return the seconds since it was created."""
        if self.bar is not None:
            self.bar.close()
        return time.perf_counter() - self.start


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (normal approximation)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, 1.96 * math.sqrt(variance / n)


class Summary(NamedTuple):
    """A table cell: mean and 95% half-width over the tasks that did not diverge, and how many did."""

    mean: float
    ci95: float
    diverged: int = 0
    tasks: int = 0


def summarize(values: Sequence[float], diverged_above: float) -> Summary:
    """:func:`mean_interval` over the values that are finite and at most ``diverged_above``.

    The others are counted as diverged (a fine-tuning that blew up on that task) instead of
    being averaged in, where a single one would make the mean meaningless (``inf``, ``nan`` or
    1e12). When every value diverged, the mean and half-width are NaN (the table says so in
    words).
    """
    kept = [v for v in values if math.isfinite(v) and v <= diverged_above]
    diverged = len(values) - len(kept)
    if not kept:
        return Summary(math.nan, math.nan, diverged, len(values))
    mean, half = mean_interval(kept)
    return Summary(mean, half, diverged, len(values))


def format_table(
    title: str,
    columns: Sequence[str],
    rows: Mapping[str, Sequence[tuple[float, float] | Summary]],
    digits: int,
) -> str:
    """A text table of ``mean ± half-width`` cells, one row per method.

    Numbers print with ``digits`` decimals, in scientific notation from 10,000 on (a run whose
    fine-tuning diverged on some task has an enormous mean, which would widen every column). A
    :class:`Summary` cell with diverged tasks prints ``(k diverged)`` after its numbers (which are
    then over the other tasks), or ``all k diverged``.
    """

    def number(value: float) -> str:
        return f"{value:.{digits}e}" if math.isfinite(value) and abs(value) >= 1e4 else f"{value:.{digits}f}"

    def cell(value: tuple[float, float] | Summary) -> str:
        mean, half = value[0], value[1]
        diverged = value.diverged if isinstance(value, Summary) else 0
        if isinstance(value, Summary) and diverged and diverged == value.tasks:
            return f"all {diverged} diverged"
        text = f"{number(mean)} ± {number(half)}"
        return f"{text} ({diverged} diverged)" if diverged else text

    cells = {name: [cell(value) for value in values] for name, values in rows.items()}
    width = max(len(c) for c in [*columns, *(c for row in cells.values() for c in row)])
    name_width = max(len("method"), *(len(n) for n in rows))
    lines = [title, "  ".join(["method".ljust(name_width)] + [c.rjust(width) for c in columns])]
    for name, row in cells.items():
        lines.append("  ".join([name.ljust(name_width)] + [c.rjust(width) for c in row]))
    return "\n".join(lines)


def table_json(
    columns: Sequence[str], rows: Mapping[str, Sequence[tuple[float, float] | Summary]]
) -> dict[str, dict[str, dict[str, float]]]:
    """The table's numbers: ``{method: {column: {"mean": m, "ci95": h}}}``.

    A :class:`Summary` cell also gives ``"diverged"`` (tasks left out of the mean) and ``"tasks"``.
    """

    def entry(value: tuple[float, float] | Summary) -> dict[str, float]:
        if isinstance(value, Summary):
            return {"mean": value.mean, "ci95": value.ci95, "diverged": value.diverged, "tasks": value.tasks}
        return {"mean": value[0], "ci95": value[1]}

    return {name: {column: entry(value) for column, value in zip(columns, values)} for name, values in rows.items()}


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend, or a clear error without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise DemoError("the plot needs matplotlib: pip install 'higher[demo]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Write ``fig`` as a PNG, creating the folder if needed.

    The PNG is written under a temporary name in the same folder and then renamed, so that an
    interrupted run (Ctrl-C) or a failed write never leaves a half-written file under ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        fig.savefig(partial, dpi=110, format="png")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def steps_label(step: int) -> str:
    """``"1 step"``, ``"10 steps"``."""
    return f"{step} step" + ("" if step == 1 else "s")


def to_jsonable(value: Any) -> Any:
    """Options and results as JSON values: paths and devices as strings, NaN as null, tensors as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def json_line(record: Mapping[str, Any]) -> str:
    """One line of strict JSON (no NaN), for the last line of stdout under ``--json``."""
    return json.dumps(to_jsonable(record), allow_nan=False, separators=(",", ":"))


def peak_rss_mib() -> float:
    """The process's peak resident memory so far in MiB (``resource.getrusage``; NaN where unavailable).

    It is the whole process's high-water mark: a method's own peak only when it runs in a fresh process.
    """
    try:
        import resource  # POSIX only
    except ImportError:  # pragma: no cover - Windows
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024
