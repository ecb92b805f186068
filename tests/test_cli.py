"""The command line: parsing, defaults, dispatch to higher.demos, --json, clear errors."""

import json
import subprocess
import sys

import pytest
import torch

from devices import DEVICES
from higher import cli
from higher.demos import digits, hyper, sinusoid
from small_problems import logreg_validation_after_descent

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC


def resolve(*argv):
    return cli._resolve(cli.build_parser().parse_args(["demo", *argv]))


def test_sinusoid_demo_tiny_run(tmp_path, capsys):
    out = tmp_path / "plots" / "sinusoid.png"
    assert cli.main(["demo", "--iterations", "3", "--test-tasks", "4", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "MSE on 4 test tasks" in printed and "task-batched" in printed
    for row in ("MAML", "pretrained"):
        assert any(line.startswith(row) and line.count("±") == 3 for line in printed.splitlines())
    assert "0 steps" in printed and "1 step" in printed and "10 steps" in printed
    assert is_png(out)


# (argv, experiment, also on CUDA): on a GPU the first of each kind runs there too (the tests' CUDA cases
# share the GPU check's two minutes); the CPU runs them all.
DEMO_RUNS = [
    (["--iterations", "3", "--test-tasks", "4"], "sinusoid", True),
    (["sinusoid", "--algorithm", "anil", "--iterations", "2", "--test-tasks", "3", "--per-task"], "sinusoid", False),
    (["digits", "--iterations", "2", "--test-tasks", "3", "--ways", "3", "--val-tasks", "5"], "digits", True),
    (["hyper", "--iterations", "2", "--inner-steps", "2", "--test-tasks", "2"], "hyper", True),
    (["hyper", "--method", "forward", "--iterations", "1", "--steps", "2", "--test-tasks", "2"], "hyper", False),
    (["sinusoid", "--algorithm", "imaml", "--iterations", "1", "--test-tasks", "3"], "sinusoid", True),
    (["--algorithm", "imaml", "--iterations", "1", "--test-tasks", "3"], "sinusoid", False),
]
DEMO_CASES = [
    pytest.param(argv, experiment, torch.device(device), id=f"{device}-argv{index}-{experiment}")
    for device in DEVICES
    for index, (argv, experiment, on_gpu) in enumerate(DEMO_RUNS)
    if device == "cpu" or on_gpu
]


@pytest.mark.parametrize(("argv", "experiment", "device"), DEMO_CASES)
def test_json_is_the_last_line_with_the_tables_numbers(argv, experiment, device, tmp_path, capsys):
    """Every demo (and algorithm family) runs with ``--device`` (CUDA too where present) and prints its JSON."""
    out = tmp_path / "x.png"
    assert cli.main(["demo", *argv, "--device", str(device), "--out", str(out), "--no-progress", "--json"]) == 0
    lines = capsys.readouterr().out.rstrip("\n").splitlines()
    record = json.loads(lines[-1])
    assert record["experiment"] == experiment and record["options"]["device"] == str(device)
    assert record["options"]["out"] == str(out) and record["options"]["threads"] == 1
    assert record["options"]["iterations"] == int(argv[argv.index("--iterations") + 1])
    assert "total_s" in record["timings"]
    printed = "\n".join(lines[:-1])
    if experiment == "hyper":
        learned = record["table"]["learned hyperparameters"]["validation_mse"]
        assert f"{learned['mean']:.3f} ± {learned['ci95']:.3f}" in printed
    else:
        digits_shown = 1 if experiment == "digits" else 3
        table = printed[printed.index("\nmethod ") :].splitlines()
        for method, cells in record["table"].items():
            row = next(line for line in table if line.startswith(method + " "))
            for cell in cells.values():
                assert f"{cell['mean']:.{digits_shown}f} ± {cell['ci95']:.{digits_shown}f}" in row


def test_without_json_no_json_line(tmp_path, capsys):
    cli.main(["demo", "--iterations", "1", "--test-tasks", "2", "--out", str(tmp_path / "x.png"), "--no-progress"])
    assert not capsys.readouterr().out.splitlines()[-1].startswith("{")


def test_defaults_and_configs():
    args = resolve()
    config = cli.config_of(args)
    assert isinstance(config, sinusoid.SinusoidConfig)
    assert config.iterations == sinusoid.DEFAULTS["iterations"] == 70000
    assert (config.algorithm, config.per_task, config.shots, config.test_tasks) == ("maml", False, 10, 600)
    assert str(args.out) == "higher-demo.png" and args.threads == 1 and args.json is False
    digits_config = cli.config_of(resolve("digits", "--val-tasks", "9"))
    assert isinstance(digits_config, digits.DigitsConfig) and digits_config.val_tasks == 9
    assert cli.config_of(resolve("digits")).val_tasks == 300  # type: ignore[union-attr]
    hyper_config = cli.config_of(resolve("hyper", "--inner-steps", "7"))
    assert isinstance(hyper_config, hyper.HyperConfig) and hyper_config.inner_steps == 7
    assert hyper_config.method == "unrolled" and hyper_config.shots == 20


def test_algorithm_and_first_order_options():
    assert resolve("sinusoid", "--first-order").algorithm == "fomaml"
    assert resolve("sinusoid", "--algorithm", "fomaml").first_order is True
    assert resolve("sinusoid", "--algorithm", "metasgd").algorithm == "metasgd"
    assert cli.config_of(resolve("sinusoid", "--per-task", "--algorithm", "anil")).per_task is True
    assert resolve().algorithm == "maml" and resolve().first_order is False


def test_demo_algorithm_without_sinusoid_runs_the_sinusoid_demo():
    """``higher demo --algorithm imaml`` (no experiment named) is the sinusoid demo with that algorithm,
    at that algorithm's default iterations; on another experiment the option is refused by name."""
    for argv in (("--algorithm", "imaml"), ("sinusoid", "--algorithm", "imaml"), ("--algorithm", "imaml", "sinusoid")):
        args = resolve(*argv)
        assert (args.experiment, args.algorithm) == ("sinusoid", "imaml")
        assert args.iterations == sinusoid.IMAML.default_iterations
    assert resolve("--algorithm", "imaml", "--iterations", "5").iterations == 5
    assert resolve("--first-order").algorithm == "fomaml"
    assert resolve("--algorithm", "anil").iterations == sinusoid.ANIL.default_iterations


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--algorithm", "imaml", "digits"], "--algorithm"),
        (["digits", "--algorithm", "imaml"], "--algorithm"),
        (["--first-order", "hyper"], "--first-order"),
        (["hyper", "--first-order"], "--first-order"),
    ],
)
def test_demo_algorithm_on_another_experiment_says_it_belongs_to_sinusoid(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", *argv])
    assert exit_info.value.code == 2
    assert f"{flag}: an option of the sinusoid demo" in capsys.readouterr().err


def test_compile_options_reach_the_sinusoid_config():
    assert cli.config_of(resolve()).compile is None  # type: ignore[union-attr]
    assert cli.config_of(resolve("--no-compile")).compile is False  # type: ignore[union-attr]
    assert cli.config_of(resolve("sinusoid", "--no-compile")).compile is False  # type: ignore[union-attr]
    assert cli.config_of(resolve("--compile", "sinusoid")).compile is True  # type: ignore[union-attr]


def test_long_cpu_runs_compile_by_default_and_no_compile_keeps_them_eager(monkeypatch):
    """The default decision, as the command line resolves it (nothing is run or compiled here), on a
    torch that compiles inner loops (>= 2.11; tests/demos/test_sinusoid.py checks the choice on older ones)."""
    monkeypatch.setattr(sinusoid._tracing, "compile_supported", lambda: True)
    cpu = torch.device("cpu")

    def compiled(*argv):
        return sinusoid.compile_choice(cli.config_of(resolve(*argv)), cpu)[0]  # type: ignore[arg-type]

    assert sinusoid.COMPILE_BY_DEFAULT is True and sinusoid.COMPILE_FROM == 20000
    assert compiled() is True  # the default run: 70,000 iterations
    assert compiled("--iterations", "20000") is True
    assert compiled("sinusoid", "--iterations", "20000", "--algorithm", "metasgd") is True
    assert compiled("--iterations", "19999") is False
    assert compiled("--iterations", "20000", "--no-compile") is False
    assert compiled("--no-compile", "sinusoid", "--iterations", "70000") is False
    assert compiled("--iterations", "300", "--compile") is True
    assert compiled("--iterations", "20000", "--per-task") is False
    assert compiled("sinusoid", "--iterations", "20000", "--algorithm", "imaml") is False


def test_options_work_before_and_after_the_experiment_name():
    before, after = resolve("--iterations", "7", "digits"), resolve("digits", "--iterations", "7")
    assert before.iterations == after.iterations == 7
    assert before.experiment == after.experiment == "digits"
    assert resolve("--json", "hyper").json is True and resolve("hyper", "--json").json is True
    assert resolve("digits").iterations == cli.DEFAULTS["digits"]["iterations"]


BAD_OPTIONS = [
    (["demo", "--iterations", "-5"], "must be 0 or more"),
    (["demo", "--iterations", "many"], "expected a whole number"),
    (["demo", "--shots", "0"], "must be at least 1"),
    (["demo", "--device", "tpu"], "unknown device"),
    (["demo", "--out", "result.jpg"], "must be a .png file"),
    (["demo", "--test-tasks", "0"], "must be at least 1"),
    (["demo", "digits", "--ways", "20"], "at most 8"),
    (["demo", "digits", "--shots", "170", "--iterations", "0"], "exceeds"),
    (["demo", "sinusoid", "--algorithm", "reptile"], "invalid choice"),
    (["demo", "sinusoid", "--first-order", "--algorithm", "anil"], "cannot be combined"),
    (["demo", "hyper", "--method", "guess"], "invalid choice"),
    (["demo", "hyper", "--method", "implicit"], "does not apply to the sinusoid problem"),
    (["demo", "hyper", "--problem", "mnist"], "invalid choice"),
    (["demo", "sideways"], "invalid choice"),
    (["demo", "--compile", "--no-compile"], "not allowed with argument"),
    (["demo", "--no-compile", "digits", "--iterations", "0"], "--no-compile is an option of the sinusoid demo"),
    (["demo", "sinusoid", "--compile", "--algorithm", "imaml"], "--compile: iMAML is not compiled"),
    (["demo", "sinusoid", "--compile", "--per-task"], "--compile: the per-task path (--per-task) is not compiled"),
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


@pytest.mark.parametrize(
    ("out", "message"),
    [("/proc/higher-demo.png", "cannot be written"), ("/proc/no-such-folder/demo.png", "cannot be written")],
)
def test_an_unwritable_out_is_refused_before_training(out, message, capsys, monkeypatch):
    def must_not_train(*args, **kwargs):
        raise AssertionError("the demo started although --out cannot be written")

    monkeypatch.setattr("higher.demos.sinusoid.run", must_not_train)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--out", out])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_writable_out_is_left_as_it_was(tmp_path):
    existing = tmp_path / "old.png"
    existing.write_bytes(b"keep")
    assert cli._png_path(str(existing)) == existing and existing.read_bytes() == b"keep"
    new = tmp_path / "new.png"
    assert cli._png_path(str(new)) == new and not new.exists()


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        cli.main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_python_dash_m_higher_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "higher", "demo", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for option in ("--iterations", "digits", "hyper", "--json", "--per-task", "70000", "--no-compile", "20000"):
        assert option in result.stdout


def test_each_demo_documents_its_options(capsys):
    sinusoid = _help(capsys, "demo", "sinusoid")
    assert "maml" in sinusoid and "metasgd" in sinusoid and "anil" in sinusoid and "imaml" in sinusoid
    hyper_help = _help(capsys, "demo", "hyper")
    for option in ("--steps", "checkpointed", "forward", "implicit", "logreg", "affordable"):
        assert option in hyper_help


def test_hyper_method_and_problem_defaults():
    assert resolve("hyper").iterations == 200 and resolve("hyper").inner_steps == 50
    assert resolve("hyper", "--steps", "7").inner_steps == 7 == resolve("hyper", "--inner-steps", "7").inner_steps
    forward = resolve("hyper", "--method", "forward")
    assert forward.iterations == hyper.FORWARD_ITERATIONS < 200
    assert resolve("hyper", "--method", "forward", "--iterations", "9").iterations == 9
    logreg = cli.config_of(resolve("hyper", "--problem", "logreg", "--method", "implicit"))
    assert isinstance(logreg, hyper.HyperConfig)
    assert (logreg.problem, logreg.method, logreg.iterations, logreg.inner_steps) == ("logreg", "implicit", 10, 100)


def _hyper_json(argv, tmp_path, capsys):
    assert cli.main(["demo", "hyper", *argv, "--out", str(tmp_path / "h.png"), "--no-progress", "--json"]) == 0
    printed = capsys.readouterr().out.rstrip("\n").splitlines()
    record = json.loads(printed[-1])
    assert record["hypergradient"]["peak_rss_mib"] > 0 and record["hypergradient"]["seconds"] > 0
    assert is_png(tmp_path / "h.png")
    return record, "\n".join(printed[:-1])


def test_hyper_methods_print_the_same_first_hypergradient_on_the_sinusoid_problem(tmp_path, capsys):
    """float64 (conftest): checkpointed equals unrolled to 1e-10; forward mode to 1e-8."""
    first = {}
    for method in ("unrolled", "checkpointed", "forward"):
        argv = ["--method", method, "--iterations", "1", "--steps", "3", "--test-tasks", "2"]
        record, printed = _hyper_json(argv, tmp_path, capsys)
        first[method] = torch.tensor(record["hypergradient"]["first"])
        assert record["hypergradient"]["method"] == method and f"{method} hypergradient at the first" in printed
    assert first["unrolled"].abs().min() > 0
    torch.testing.assert_close(first["checkpointed"], first["unrolled"], rtol=1e-10, atol=0)
    torch.testing.assert_close(first["forward"], first["unrolled"], rtol=1e-8, atol=0)


def test_hyper_logreg_runs_each_method_as_the_library_does(tmp_path, capsys):
    """hypertorch's problem (float64 always), through the CLI, T=20, one outer step per method.

    Each method's first hypergradient is the one :func:`higher.hypergradients.hypergradient` computes
    for that method (the CLI passes the method, steps and problem through, nothing else), every run
    starts from the validation loss after 20 steps of gradient descent at lambda = 1 (written out
    here; the published value at T=100 is checked by the next test) and the outer step lowers it.
    Checkpointed and forward mode equal the unrolled hypergradient to rounding; the implicit one is
    exact only at the inner minimiser, which 20 steps do not reach (that the four agree once the
    inner loop has converged, T=100, is tests/test_hypergradients.py's
    test_four_methods_agree_on_the_published_problem).
    """
    from higher.hypergradients import _logreg_losses, hypergradient, logreg_problem

    first = {}
    for method in hyper.ALL_METHODS:
        argv = ["--problem", "logreg", "--method", method, "--iterations", "1", "--steps", "20"]
        record, printed = _hyper_json(argv, tmp_path, capsys)
        first[method] = torch.tensor(record["hypergradient"]["first"], dtype=torch.float64)
        assert first[method].shape == (20,) and f"{method} hypergradient at the first" in printed
        losses = record["history"]["validation loss"]  # after 0 and 1 outer steps
        assert len(losses) == 2 and losses[1] < losses[0]
        assert losses[0] == pytest.approx(logreg_validation_after_descent(torch.ones(20), 20), rel=1e-12)
        model, x_train, y_train, x_val, y_val = logreg_problem()
        inner, outer = _logreg_losses(x_train, y_train, x_val, y_val)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        expected = hypergradient(method, model, opt, [torch.ones(20, dtype=torch.float64)], inner, outer, 20)
        torch.testing.assert_close(first[method], expected.hypergradients[0], rtol=1e-12, atol=1e-15)
    reference = first["unrolled"]
    assert reference.abs().max() > 1e-2
    torch.testing.assert_close(first["checkpointed"], reference, rtol=1e-10, atol=0)
    torch.testing.assert_close(first["forward"], reference, rtol=1e-8, atol=1e-14)
    assert (first["implicit"] - reference).abs().max() > 1e-6  # not converged after 20 steps: not the same


def test_hyper_logreg_prints_the_loss_after_the_last_step_and_records_only_its_options(tmp_path, capsys):
    """The final validation loss is the one at the learned lambda (was the one before the last update),
    and --json lists only the options --problem logreg uses (no shots, query, initial lr or momentum,
    test tasks, per-task or seed). It starts from the published validation loss at lambda = 1 (hypertorch's
    notebook, T=100, float32: 0.5743989944458008; ours in float64 within one float32 ulp)."""
    argv = ["--problem", "logreg", "--iterations", "1", "--steps", "100"]
    record, printed = _hyper_json(argv, tmp_path, capsys)
    losses = record["history"]["validation loss"]  # after 0 and 1 outer steps
    assert len(losses) == 2 and len(record["history"]["seconds"]) == 1
    before, after = losses
    assert abs(before - 0.5743989944458008) < 2.0**-24
    lam = torch.tensor(record["final_lambda"], dtype=torch.float64)
    assert after == pytest.approx(logreg_validation_after_descent(lam, 100), rel=1e-12)
    assert after < before
    assert f"validation BCE {before:.7f} (lambda = 1) -> {after:.7f} after 1 outer steps" in printed
    assert "validation BCE 0.5743990 (lambda = 1)" in printed  # hypertorch's 0.5743989944458008
    used = {"iterations", "inner_steps", "inner_lr", "hyper_lr", "method", "problem", "device", "out", "threads"}
    assert set(record["options"]) == used
    assert (record["options"]["iterations"], record["options"]["inner_steps"]) == (1, 100)


@pytest.mark.parametrize(
    "argv",
    [
        ["hyper", "--problem", "logreg", "--seed", "3"],
        ["--seed", "0", "hyper", "--problem", "logreg"],
        ["hyper", "--problem", "logreg", "--shots", "5"],
        ["hyper", "--problem", "logreg", "--test-tasks", "10"],
        ["hyper", "--problem", "logreg", "--per-task"],
    ],
)
def test_logreg_refuses_the_options_it_has_no_use_for(argv):
    with pytest.raises(cli.CliError, match="not used by --problem logreg"):
        resolve(*argv)


def test_common_options_default_when_not_given():
    for experiment in ("sinusoid", "digits", "hyper"):
        args = resolve(experiment)
        assert (args.seed, args.test_tasks, args.per_task) == (0, 600, False)
    args = resolve("hyper", "--problem", "logreg")
    assert (args.seed, args.test_tasks, args.per_task) == (0, 600, False)
    args = resolve("--seed", "7", "--test-tasks", "9", "--per-task", "hyper")
    assert (args.seed, args.test_tasks, args.per_task) == (7, 9, True)
