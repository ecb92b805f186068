"""A skeptical user's command line: Ctrl-C, missing optional packages, out-of-range values, half-written PNGs."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from higher import cli
from higher.demos import common

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def test_ctrl_c_during_training_exits_130_with_one_clear_line(tmp_path):
    """SIGINT mid-run: exit status 130, "interrupted" on stderr, no traceback, no PNG."""
    out = tmp_path / "demo.png"
    argv = [sys.executable, "-m", "higher", "demo", "--iterations", "1000000", "--no-compile", "--no-progress"]
    process = subprocess.Popen(
        [*argv, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        # A shell without job control starts background jobs with SIGINT ignored, and the child would inherit it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # wait until meta-training runs (the first progress line), then interrupt
            if "running meta-loss" in line:
                break
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted" in err
    assert not out.exists()


def test_main_returns_130_on_keyboard_interrupt(monkeypatch, tmp_path, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("higher.demos.sinusoid.run", interrupted)
    assert cli.main(["demo", "--iterations", "1", "--out", str(tmp_path / "x.png")]) == 130
    assert "higher: interrupted" in capsys.readouterr().err


def test_a_figure_interrupted_while_saving_leaves_no_file(tmp_path):
    """The PNG is written under a temporary name and renamed: a half-written one never has the final name."""
    plt = common.pyplot()
    fig = plt.figure()
    out = tmp_path / "plot.png"

    class Interrupting:
        def savefig(self, path, **kwargs):
            Path(path).write_bytes(b"\x89PNG half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        common.save_figure(Interrupting(), out)
    assert list(tmp_path.iterdir()) == []
    common.save_figure(fig, out)
    plt.close(fig)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["plot.png"]


@pytest.fixture
def without(monkeypatch):
    """Make ``import name`` fail as if the package were not installed."""

    def block(*names):
        for name in names:
            for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                monkeypatch.delitem(sys.modules, loaded)
            monkeypatch.setitem(sys.modules, name, None)  # import then raises ImportError

    return block


@pytest.mark.parametrize("experiment", ["sinusoid", "digits", "hyper"])
def test_without_matplotlib_the_demo_stops_before_training(experiment, without, monkeypatch, tmp_path, capsys):
    without("matplotlib")
    trained = []
    monkeypatch.setattr("higher.demos.sinusoid.train_meta", lambda *a, **k: trained.append(1))
    monkeypatch.setattr("higher.demos.digits.train_maml", lambda *a, **k: trained.append(1))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", experiment, "--iterations", "1", "--test-tasks", "2", "--out", str(tmp_path / "x.png")])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert "matplotlib" in captured.err and "pip install 'higher[demo]'" in captured.err
    assert not trained and "±" not in captured.out


def test_without_scikit_learn_the_digits_demo_says_what_to_install(without, tmp_path, capsys):
    without("sklearn")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "digits", "--iterations", "1", "--test-tasks", "2", "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert "scikit-learn" in capsys.readouterr().err


def test_without_tqdm_the_progress_is_printed_lines(without, capsys):
    without("tqdm")
    bar = common.Progress(4, enabled=True, label="MAML")
    for i in range(1, 5):
        bar.update(i, 1.0)
    bar.close()
    printed = capsys.readouterr().out
    assert "install tqdm" in printed and "MAML: 4/4" in printed


def test_the_library_imports_and_runs_without_the_demo_extras():
    """torch is the only runtime dependency: import higher (and its modules) with matplotlib, tqdm and sklearn gone."""
    code = (
        "import sys\n"
        "for name in ('matplotlib', 'tqdm', 'sklearn'): sys.modules[name] = None\n"
        "import torch, higher, higher.algorithms, higher.data, higher.distributed, higher.compiled, higher.cli\n"
        "model = torch.nn.Linear(2, 1)\n"
        "with higher.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1),"
        " copy_initial_weights=False) as (f, d):\n"
        "    d.step(f(torch.ones(3, 2)).pow(2).sum())\n"
        "    f(torch.ones(3, 2)).pow(2).sum().backward()\n"
        "assert model.weight.grad is not None\n"
        "batch = higher.data.SinusoidTasks(seed=0).sample(2)\n"
        "print('ok', tuple(batch.support_x.shape))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ok (2, 10, 1)" in result.stdout


@pytest.mark.parametrize("seed", ["99999999999999999999", str(2**64 - 1), str(-(2**63) - 1)])
def test_a_seed_torch_cannot_take_is_a_clear_error(seed, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--seed", seed, "--iterations", "1", "--test-tasks", "2", "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--seed" in err and "Traceback" not in err


def test_seeds_at_the_ends_of_the_range_are_accepted():
    parser = cli.build_parser()
    for seed in (0, -1, 2**64 - 2, -(2**63)):
        assert parser.parse_args(["demo", "--seed", str(seed)]).seed == seed


def test_the_largest_seed_runs(tmp_path):
    """--seed 2**64 - 2: the demo also seeds with seed + 1, still in torch's range."""
    out = tmp_path / "x.png"
    argv = ["demo", "--seed", str(2**64 - 2), "--iterations", "1", "--test-tasks", "2", "--no-progress"]
    assert cli.main([*argv, "--out", str(out)]) == 0 and out.exists()


def test_zero_iterations_print_no_nan_timing(tmp_path, capsys):
    """--iterations 0 (documented: "0: none") evaluates the initialisation; the timing line says so, not "nan ms"."""
    argv = ["demo", "--iterations", "0", "--test-tasks", "2", "--no-progress", "--out", str(tmp_path / "x.png")]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "nan" not in printed and "no meta-training iterations" in printed


def test_out_in_a_folder_where_no_new_file_can_be_made_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """The PNG is written under a temporary name beside --out, then renamed: the folder must take new files.

    (An existing writable file in a read-only folder passed the old check and failed at the end of the run.)
    Simulated by making the probe file fail, since the tests may run as root.
    """
    existing = tmp_path / "old.png"
    existing.write_bytes(b"keep")

    def read_only_folder(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.NamedTemporaryFile", read_only_folder)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--iterations", "1", "--out", str(existing)])
    assert exit_info.value.code == 2 and "cannot be written (Permission denied)" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep"
