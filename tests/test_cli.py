"""The command line on tiny settings: it runs, prints its table, writes its PNG, rejects bad options."""

import subprocess
import sys

import pytest
import torch

from higher import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC


def test_sinusoid_demo_tiny_run(tmp_path, capsys):
    out = tmp_path / "plots" / "sinusoid.png"
    assert cli.main(["demo", "--iterations", "3", "--test-tasks", "4", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "MSE on 4 test tasks" in printed
    for row in ("MAML", "pretrained"):
        assert any(line.startswith(row) and line.count("±") == 3 for line in printed.splitlines())
    assert "0 steps" in printed and "1 step" in printed and "10 steps" in printed
    assert is_png(out)


def test_sinusoid_results_are_seeded_and_first_order_runs(tmp_path):
    parser = cli.build_parser()

    def run(*extra):
        args = cli._resolve(parser.parse_args(["demo", "--iterations", "2", "--test-tasks", "3", *extra]))
        config = cli.SinusoidConfig(
            iterations=args.iterations, test_tasks=args.test_tasks, seed=args.seed, first_order=args.first_order
        )
        args.out = tmp_path / "x.png"
        args.no_progress = True
        return cli.run_sinusoid(args, config)

    first, again = run("--seed", "4"), run("--seed", "4")
    assert first == again
    assert run("--seed", "5") != first
    first_order = run("sinusoid", "--first-order", "--seed", "4")
    assert list(first_order) == ["first-order MAML", "pretrained"]


def test_sinusoid_defaults_are_the_papers_setup():
    args = cli._resolve(cli.build_parser().parse_args(["demo"]))
    config = cli.SinusoidConfig(iterations=args.iterations, shots=args.shots)
    assert (config.shots, config.meta_batch, config.inner_lr, config.inner_steps, config.meta_lr) == (
        10,
        25,
        0.01,
        1,
        1e-3,
    )
    assert (config.test_tasks, config.eval_steps) == (600, 10)
    assert args.test_tasks == 600 and args.iterations > 0 and str(args.out).endswith(".png")
    sizes = [tuple(p.shape) for p in cli.sinusoid_model().parameters()]
    assert sizes == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]


def test_digits_demo_tiny_run(tmp_path, capsys):
    out = tmp_path / "digits.png"
    argv = [
        "demo",
        "digits",
        "--iterations",
        "2",
        "--test-tasks",
        "3",
        "--ways",
        "3",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "accuracy (%) on 3 test tasks (3-way 1-shot" in printed
    assert is_png(out)


def test_hyper_demo_tiny_run(tmp_path, capsys):
    out = tmp_path / "hyper.png"
    argv = ["demo", "hyper", "--iterations", "3", "--inner-steps", "2", "--test-tasks", "2", "--out", str(out)]
    assert cli.main(argv + ["--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "learned hyperparameters" in printed and "initial hyperparameters" in printed
    assert is_png(out)


def test_options_work_before_and_after_the_experiment_name(tmp_path):
    parser = cli.build_parser()
    before = cli._resolve(parser.parse_args(["demo", "--iterations", "7", "digits"]))
    after = cli._resolve(parser.parse_args(["demo", "digits", "--iterations", "7"]))
    assert before.iterations == after.iterations == 7
    assert before.experiment == after.experiment == "digits"
    assert cli._resolve(parser.parse_args(["demo", "digits"])).iterations == cli.DEFAULTS["digits"]["iterations"]


BAD_OPTIONS = [
    (["demo", "--iterations", "-5"], "must be 0 or more"),
    (["demo", "--iterations", "many"], "expected a whole number"),
    (["demo", "--shots", "0"], "must be at least 1"),
    (["demo", "--device", "tpu"], "unknown device"),
    (["demo", "--out", "result.jpg"], "must be a .png file"),
    (["demo", "--test-tasks", "0"], "must be at least 1"),
    (["demo", "digits", "--ways", "20"], "at most 16"),
    (["demo", "digits", "--shots", "170"], "exceeds"),
    (["demo", "sideways"], "invalid choice"),
    ([], "required"),
]
if not torch.cuda.is_available():
    BAD_OPTIONS.append((["demo", "--device", "cuda"], "torch.cuda.is_available() is False"))


@pytest.mark.parametrize(("argv", "message"), BAD_OPTIONS)
def test_bad_options_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_out_may_not_be_a_directory(tmp_path, capsys):
    (tmp_path / "d.png").mkdir()
    with pytest.raises(SystemExit):
        cli.main(["demo", "--out", str(tmp_path / "d.png")])
    assert "is a directory" in capsys.readouterr().err


def test_python_dash_m_higher_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "higher", "demo", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--iterations" in result.stdout and "digits" in result.stdout and "hyper" in result.stdout
