"""The command line: ``python -m higher demo`` (also installed as the ``higher`` command).

This module only parses the options and dispatches to the experiments of :mod:`higher.demos`:

* ``higher demo`` (or ``higher demo sinusoid``) -- MAML on sinusoid regression with the protocol
  of Finn et al. (2017), 70,000 iterations, task-batched (:mod:`higher.demos.sinusoid`); its
  meta-iteration is compiled with ``torch.compile`` on CPU from 20,000 iterations on, where that
  makes the whole run faster (``--no-compile`` turns it off, ``--compile`` on for shorter runs;
  see :mod:`higher.demos.sinusoid`). ``--algorithm maml|fomaml|metasgd|anil|imaml`` (given to
  ``demo`` or to ``demo sinusoid``) picks the meta-learning algorithm, each with its own default
  iterations and inner steps.
* ``higher demo digits`` -- few-shot classification of scikit-learn's bundled digits, MAML against
  a pretrained baseline (:mod:`higher.demos.digits`).
* ``higher demo hyper`` -- learning the inner loop's learning rate and momentum by hypergradient
  descent (:mod:`higher.demos.hyper`).

``--json`` prints the results (the table's numbers, the timings and the options used) as one JSON
object on the last line of stdout. Plots need matplotlib and the progress bar uses tqdm when
present (``pip install 'higher[demo]'``); the digits need scikit-learn. Without them a demo stops
before training and says what to install. Nothing is downloaded. Ctrl-C stops a run with one line
(``higher: interrupted``) and exit status 130; the PNG is written under a temporary name and renamed
when complete, so an interrupted run leaves none.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__, distributed
from .demos import common, digits, hyper, sinusoid

__all__ = ["main", "build_parser"]

# The defaults of the options shared by all experiments, per experiment.
DEFAULTS: dict[str, dict[str, Any]] = {
    "sinusoid": sinusoid.DEFAULTS,
    "digits": digits.DEFAULTS,
    "hyper": hyper.DEFAULTS,
}
CliError = common.DemoError


# ------------------------------------------------------------------------------------ options
def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    """A seed torch's generators take: -2**63 .. 2**64 - 2 (the demos also seed with ``seed + 1``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not -(2**63) <= value <= 2**64 - 2:
        raise argparse.ArgumentTypeError(f"must lie between -2**63 and 2**64 - 2 (torch's seed range), got {value}")
    return value


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("device 'cuda' requested but torch.cuda.is_available() is False; use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"device {text!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError("device 'mps' requested but it is not available; use cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; use cpu, cuda, cuda:N or mps")
    return device


def _png_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"--out must be a .png file, got {text!r}")
    if path.exists() and path.is_dir():
        raise argparse.ArgumentTypeError(f"--out {text!r} is a directory; give a file name ending in .png")
    # Checked now, not after the whole run: the plot is written at the end.
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # the demo would make it anyway
        with open(path, "ab"):  # appends nothing: an existing file is left as it is
            pass
        # The PNG is written beside it under a temporary name, then renamed (common.save_figure).
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(
            f"--out {text!r} cannot be written ({error.strerror}); give a path in a folder you can write to"
        ) from None
    if not existed:
        path.unlink()
    return path


def _add_common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options of every experiment. In the subcommands they default to "not given"."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--iterations", type=_non_negative_int, default=default(None), help="meta-training iterations (0: none)"
    )
    parser.add_argument(
        "--shots", type=_positive_int, default=default(None), help="K, support examples per task (per class)"
    )
    parser.add_argument("--out", type=_png_path, default=default(None), help="where to write the PNG")
    parser.add_argument(
        "--seed", type=_seed, default=default(None), help="seed of the initialisation and training tasks (default 0)"
    )
    parser.add_argument("--device", type=_device, default=default(torch.device("cpu")), help="cpu, cuda, cuda:N or mps")
    parser.add_argument(
        "--test-tasks", type=_positive_int, default=default(None), help="number of seeded test tasks (default 600)"
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=default(1), help="torch CPU threads (default 1: fastest for this size)"
    )
    parser.add_argument(
        "--per-task",
        action="store_true",
        default=default(None),
        help="run the inner loops task by task instead of all tasks of a batch at once (slower; same numbers "
        "up to floating-point summation order)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        default=default(False),
        help="no progress bar: print a line every 10%% of the iterations instead",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="also print the results (table numbers, timings, options) as one JSON object on the last line",
    )


def _add_compile_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """``--compile`` / ``--no-compile`` (sinusoid only): given on ``demo`` or on ``demo sinusoid``."""
    default = argparse.SUPPRESS if suppress else None
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=default,
        help="sinusoid: compile the task-batched meta-iteration (MAML, first-order MAML, Meta-SGD, ANIL; its "
        f"backward pass included) with torch.compile, also in runs shorter than {sinusoid.COMPILE_FROM} "
        "iterations, where it is not the default. Measured 2.4x faster per iteration (MAML: 2.8 against 6.7 ms) "
        f"after 35-60 s of compilation in a fresh process, so it pays from about {sinusoid.COMPILE_FROM} "
        "iterations on, where CPU runs compile by default (the default run: 237-428 s instead of 546-683 s "
        "eagerly, load average about 4)",
    )
    choice.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        default=default,
        help="sinusoid: run the meta-iteration eagerly (the default below "
        f"{sinusoid.COMPILE_FROM} iterations and on devices other than CPU). Compiled and eager kernels round "
        "differently: the meta-gradients agree to float32 rounding and a 300-iteration run prints the same table, "
        "but over 70,000 Adam steps the rounding grows into another trajectory, and the table then differs as "
        "between seeds (see higher.demos.sinusoid)",
    )


def _add_algorithm_options(parser: argparse.ArgumentParser, suppress: bool, hidden: bool = False) -> None:
    """``--algorithm`` / ``--first-order`` (sinusoid only): given on ``demo`` or on ``demo sinusoid``.

    ``hidden``: accepted but not shown in ``--help`` (``demo digits`` and ``demo hyper``), so that
    ``demo digits --algorithm imaml`` is refused with a message that names the sinusoid demo
    instead of argparse's "unrecognized arguments"."""
    default = argparse.SUPPRESS if suppress else None
    defaults = ", ".join(
        f"{name} {learner.default_iterations}" for name, learner in sorted(sinusoid.ALGORITHMS.items())
    )
    parser.add_argument(
        "--algorithm",
        choices=sorted(sinusoid.ALGORITHMS),
        default=default,
        help=argparse.SUPPRESS
        if hidden
        else "sinusoid: the meta-learning algorithm (default maml). Each fine-tunes the test tasks as it adapts "
        f"in meta-training; default iterations: {defaults}",
    )
    parser.add_argument(
        "--first-order",
        action="store_true",
        default=default,
        help=argparse.SUPPRESS
        if hidden
        else "sinusoid: first-order MAML instead of second order (= --algorithm fomaml)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``higher`` command."""
    parser = argparse.ArgumentParser(prog="higher", description="higher: differentiate through optimization loops.")
    parser.add_argument("--version", action="version", version=f"higher {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    demo = commands.add_parser(
        "demo",
        help="meta-learning demos (default: MAML on sinusoid regression)",
        description=(
            "MAML on sinusoid regression (Finn et al. 2017) by default; 'digits' and 'hyper' run the other "
            f"demos. Defaults: sinusoid {sinusoid.DEFAULTS['iterations']} iterations (the paper's), K=10; digits "
            f"{digits.DEFAULTS['iterations']} iterations, 5-way 1-shot; hyper {hyper.DEFAULTS['iterations']} "
            "iterations, 20 points."
        ),
    )
    _add_common_options(demo, suppress=False)
    _add_compile_options(demo, suppress=False)
    _add_algorithm_options(demo, suppress=False)
    experiments = demo.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    sinusoid_parser = experiments.add_parser("sinusoid", help="MAML on sinusoid regression (the default)")
    _add_common_options(sinusoid_parser, suppress=True)
    _add_compile_options(sinusoid_parser, suppress=True)
    _add_algorithm_options(sinusoid_parser, suppress=True)
    digits_parser = experiments.add_parser(
        "digits", help="few-shot classification of sklearn's digits, MAML vs baseline"
    )
    _add_common_options(digits_parser, suppress=True)
    _add_algorithm_options(digits_parser, suppress=True, hidden=True)
    digits_parser.add_argument(
        "--ways", type=_positive_int, default=5, help=f"classes per task (default 5, at most {digits.MAX_WAYS})"
    )
    digits_parser.add_argument(
        "--val-tasks",
        type=_positive_int,
        default=300,
        help="meta-validation tasks on which each method's fine-tuning is chosen (default 300)",
    )
    hyper_parser = experiments.add_parser("hyper", help="learn the inner learning rate and momentum by hypergradient")
    _add_common_options(hyper_parser, suppress=True)
    _add_algorithm_options(hyper_parser, suppress=True, hidden=True)
    hyper_parser.add_argument(
        "--inner-steps",
        "--steps",
        dest="inner_steps",
        type=_positive_int,
        default=None,
        help=f"T, the inner steps the hypergradient goes through (default 50; {hyper.LOGREG_DEFAULTS['inner_steps']} "
        "with --problem logreg)",
    )
    hyper_parser.add_argument(
        "--method",
        choices=hyper.ALL_METHODS,
        default="unrolled",
        help="how the hypergradient is computed: unrolled (reverse mode through the loop, the default), "
        "checkpointed (the same numbers in O(sqrt T) memory), forward (forward mode: memory flat in T, one unroll "
        f"per hyperparameter; default {hyper.FORWARD_ITERATIONS} outer iterations to keep it affordable), implicit "
        "(implicit function theorem; --problem logreg only). Each run prints its first hypergradient, the time and "
        "the peak memory",
    )
    hyper_parser.add_argument(
        "--problem",
        choices=hyper.PROBLEMS,
        default="sinusoid",
        help="sinusoid (SGD's lr and momentum on a sinusoid task, the default) or logreg (hypertorch's "
        "logistic regression: 20 per-feature L2 coefficients, float64, CPU; every --method, default "
        f"{hyper.LOGREG_DEFAULTS['iterations']} outer iterations; --shots, --test-tasks, --per-task and --seed do "
        "not apply and are refused)",
    )
    return parser


#: Options every experiment takes whose defaults are filled in by _resolve (so that it can tell
#: whether they were given), and those --problem logreg has no use for.
_COMMON_DEFAULTS: dict[str, Any] = {"seed": 0, "test_tasks": 600, "per_task": False}
_SINUSOID_ONLY = (("algorithm", "--algorithm"), ("first_order", "--first-order"))
_NOT_LOGREG = (("shots", "--shots"), ("test_tasks", "--test-tasks"), ("per_task", "--per-task"), ("seed", "--seed"))


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the experiment's defaults and check the options that depend on each other."""
    experiment = args.experiment or "sinusoid"
    args.experiment = experiment
    if experiment == "hyper":
        problem, method = getattr(args, "problem", "sinusoid"), getattr(args, "method", "unrolled")
        args.problem, args.method = problem, method
        if problem == "sinusoid" and method == "implicit":
            raise CliError(hyper._NO_IMPLICIT)
        if getattr(args, "iterations", None) is None:
            if problem == "logreg":
                args.iterations = hyper.LOGREG_DEFAULTS["iterations"]
            elif method == "forward":
                args.iterations = hyper.FORWARD_ITERATIONS
        if getattr(args, "inner_steps", None) is None:
            args.inner_steps = hyper.LOGREG_DEFAULTS["inner_steps"] if problem == "logreg" else 50
        unused = [flag for name, flag in _NOT_LOGREG if problem == "logreg" and getattr(args, name, None) is not None]
        if unused:
            raise CliError(
                f"{', '.join(unused)}: not used by --problem logreg (its data, split and seed are fixed, and it "
                "has no tasks); leave them out"
            )
    if experiment == "sinusoid":
        first_order = bool(getattr(args, "first_order", None))
        algorithm = getattr(args, "algorithm", None)
        if first_order and algorithm not in (None, "fomaml"):
            raise CliError(f"--first-order is first-order MAML; it cannot be combined with --algorithm {algorithm}")
        args.algorithm = "fomaml" if first_order else (algorithm or "maml")
        args.first_order = args.algorithm == "fomaml"
        if getattr(args, "iterations", None) is None:  # each algorithm's own (iMAML's is shorter)
            args.iterations = sinusoid.ALGORITHMS[args.algorithm].default_iterations
    else:
        given = [flag for name, flag in _SINUSOID_ONLY if getattr(args, name, None)]
        if given:
            raise CliError(f"{', '.join(given)}: an option of the sinusoid demo; demo {experiment} has no algorithms")
    for name, value in {**_COMMON_DEFAULTS, **DEFAULTS[experiment]}.items():
        if getattr(args, name, None) is None:
            setattr(args, name, _png_path(value) if name == "out" else value)
    if experiment != "sinusoid" and getattr(args, "compile", None) is not None:
        flag = "--compile" if args.compile else "--no-compile"
        raise CliError(f"{flag} is an option of the sinusoid demo; demo {experiment} runs eagerly")
    if experiment == "digits" and args.ways > digits.MAX_WAYS:
        raise CliError(
            f"--ways {args.ways}: the meta-validation split has {digits.MAX_WAYS} classes; use at most {digits.MAX_WAYS}"
        )
    return args


def config_of(args: argparse.Namespace) -> sinusoid.SinusoidConfig | digits.DigitsConfig | hyper.HyperConfig:
    """The experiment's config from the resolved options."""
    shared = {"iterations": args.iterations, "shots": args.shots, "test_tasks": args.test_tasks}
    shared.update(per_task=args.per_task, seed=args.seed)
    if args.experiment == "sinusoid":
        return sinusoid.SinusoidConfig(algorithm=args.algorithm, compile=args.compile, **shared)
    if args.experiment == "digits":
        return digits.DigitsConfig(ways=args.ways, val_tasks=args.val_tasks, **shared)
    return hyper.HyperConfig(inner_steps=args.inner_steps, method=args.method, problem=args.problem, **shared)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m higher`` and of the ``higher`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args = _resolve(args)
        torch.set_num_threads(args.threads)
        config = config_of(args)
        progress = not args.no_progress
        record: dict[str, Any]
        # Under torchrun (WORLD_SIZE > 1) the ranks share the meta-batches; rank 0 prints and plots.
        with distributed.launched(args.device) as device:
            if isinstance(config, sinusoid.SinusoidConfig):
                record = sinusoid.run(config, device, args.out, progress)
            elif isinstance(config, digits.DigitsConfig):
                record = digits.run(config, device, args.out, progress)
            else:
                if distributed.rank_and_world_size()[1] > 1:
                    raise CliError("demo hyper does not run distributed (torchrun); sinusoid and digits do")
                record = hyper.run(config, device, args.out, progress)
        if args.json and record:
            record["options"]["threads"] = args.threads
            print(common.json_line(record), flush=True)
    except CliError as error:
        parser.exit(2, f"higher: error: {error}\n")
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's status for SIGINT, no traceback and no PNG
        print("\nhigher: interrupted", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
