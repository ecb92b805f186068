"""The demos' shared helpers: statistics, tables, JSON."""

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from higher.demos import common


def test_mean_interval_is_the_normal_95_percent_interval():
    values = [0.5, 1.5, 2.0, 4.0, 3.25]
    mean, half = common.mean_interval(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert half == pytest.approx(1.96 * statistics.stdev(values) / math.sqrt(len(values)))
    one_mean, one_half = common.mean_interval([2.0])
    assert one_mean == 2.0 and math.isnan(one_half)


def test_format_table_and_table_json_hold_the_same_numbers():
    rows = {"MAML": [(3.1234, 0.2), (0.35, 0.03)], "pretrained": [(3.0, 0.21), (2.5, 0.18)]}
    text = common.format_table("title", ["0 steps", "1 step"], rows, digits=3)
    lines = text.splitlines()
    assert lines[0] == "title" and lines[1].split() == ["method", "0", "steps", "1", "step"]
    assert lines[2].split() == ["MAML", "3.123", "±", "0.200", "0.350", "±", "0.030"]
    numbers = common.table_json(["0 steps", "1 step"], rows)
    assert numbers["pretrained"]["1 step"] == {"mean": 2.5, "ci95": 0.18}


def test_format_table_keeps_diverged_runs_compact():
    """A run whose fine-tuning diverged on a test task has an enormous (or infinite) mean: it prints
    in scientific notation instead of widening every column to twenty digits."""
    rows = {
        "MAML": [(3.125, 0.23), (2536493152556.478, 4971526579010.1)],
        "pretrained": [(3.119, 0.228), (math.inf, math.nan)],
    }
    lines = common.format_table("title", ["0 steps", "10 steps"], rows, digits=3).splitlines()
    assert lines[2].split() == ["MAML", "3.125", "±", "0.230", "2.536e+12", "±", "4.972e+12"]
    assert lines[3].split() == ["pretrained", "3.119", "±", "0.228", "inf", "±", "nan"]
    assert max(len(line) for line in lines) < 60


def test_json_line_is_strict_json_on_one_line():
    record = {
        "path": Path("a/b.png"),
        "device": torch.device("cpu"),
        "nan": float("nan"),
        "inf": float("inf"),
        "tensor": torch.tensor([1.0, 2.0]),
        "nested": {1: (1, 2.5, True, None)},
    }
    line = common.json_line(record)
    assert "\n" not in line
    assert json.loads(line) == {
        "path": "a/b.png",
        "device": "cpu",
        "nan": None,
        "inf": None,
        "tensor": [1.0, 2.0],
        "nested": {"1": [1, 2.5, True, None]},
    }
    with pytest.raises(TypeError, match="object"):
        common.json_line({"x": object()})


def test_progress_prints_lines_with_the_rate_without_a_bar(capsys):
    bar = common.Progress(10, enabled=False, label="run")
    for i in range(1, 11):
        bar.update(i, 1.0)
    assert bar.close() >= 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("run: 10/10") and lines[-1].endswith("it/s")
    quiet = common.Progress(5, enabled=True, label="q", quiet=True)
    quiet.update(1, 2.0)
    assert quiet.running == 2.0 and capsys.readouterr().out == ""


def test_summarize_counts_diverged_values_and_averages_the_others():
    values = [0.5, 1.5, math.nan, 2.0, math.inf, 1e6, 4.0]
    summary = common.summarize(values, diverged_above=100.0)
    assert (summary.diverged, summary.tasks) == (3, 7)
    assert (summary.mean, summary.ci95) == common.mean_interval([0.5, 1.5, 2.0, 4.0])
    assert common.summarize([1.0, 2.0], diverged_above=100.0) == (*common.mean_interval([1.0, 2.0]), 0, 2)
    everything = common.summarize([math.nan, 1e9], diverged_above=100.0)
    assert everything.diverged == everything.tasks == 2 and math.isnan(everything.mean)


def test_format_table_and_json_say_how_many_tasks_diverged():
    rows = {
        "MAML": [common.Summary(3.0, 0.2, 0, 5), common.Summary(0.4, 0.05, 2, 5)],
        "Meta-SGD": [common.Summary(3.0, 0.2, 0, 5), common.Summary(math.nan, math.nan, 5, 5)],
        "pretrained": [(3.0, 0.21), (2.5, 0.18)],
    }
    lines = common.format_table("title", ["0 steps", "10 steps"], rows, digits=3).splitlines()
    assert lines[2].split() == ["MAML", "3.000", "±", "0.200", "0.400", "±", "0.050", "(2", "diverged)"]
    assert lines[3].split() == ["Meta-SGD", "3.000", "±", "0.200", "all", "5", "diverged"]
    assert "diverged" not in lines[4]
    numbers = common.table_json(["0 steps", "10 steps"], rows)
    assert numbers["MAML"]["10 steps"] == {"mean": 0.4, "ci95": 0.05, "diverged": 2, "tasks": 5}
    assert numbers["pretrained"]["10 steps"] == {"mean": 2.5, "ci95": 0.18}
