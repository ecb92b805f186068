"""The sinusoid experiment: the batched path equals the per-task path, algorithms, evaluation, run."""

import pytest
import torch

from higher.data import SinusoidTasks
from higher.demos import sinusoid
from torch_versions import needs_compile

from .helpers import is_png


def _grads(learner):
    return [None if p.grad is None else p.grad.clone() for p in learner.meta_parameters()]


@pytest.mark.parametrize("algorithm", sorted(sinusoid.ALGORITHMS))
def test_batched_meta_step_equals_the_per_task_path(algorithm):
    """Same meta-loss and meta-gradient (float64) from the task-batched and the per-task path."""
    config = sinusoid.SinusoidConfig(iterations=1, inner_steps=2, algorithm=algorithm)
    batch = SinusoidTasks(seed=3).sample(5)
    results = []
    for per_task in (True, False):
        torch.manual_seed(1)
        learner = sinusoid.ALGORITHMS[algorithm](sinusoid.sinusoid_model(), config)
        # Move the initialisation off torch's default so that every term matters.
        with torch.no_grad():
            for p in learner.meta_parameters():
                p.add_(0.01 * torch.randn_like(p))
        loss = learner.meta_step(batch, per_task)
        results.append((loss, _grads(learner)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    assert all(g is not None for g in grads_a) and len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert any(g.abs().max() > 0 for g in grads_a)


def test_first_order_gradient_differs_from_second_order():
    batch = SinusoidTasks(seed=3).sample(4)
    grads = {}
    for algorithm in ("maml", "fomaml"):
        torch.manual_seed(1)
        learner = sinusoid.ALGORITHMS[algorithm](sinusoid.sinusoid_model(), sinusoid.SinusoidConfig(iterations=1))
        learner.meta_step(batch, per_task=False)
        grads[algorithm] = _grads(learner)
    assert not all(torch.allclose(a, b) for a, b in zip(grads["maml"], grads["fomaml"]))


def test_anil_adapts_the_head_only_and_metasgd_learns_rates():
    config = sinusoid.SinusoidConfig(iterations=1)
    anil = sinusoid.ANIL(sinusoid.sinusoid_model(), config)
    tuning = anil.fine_tuning()
    tuned = {id(p) for group in tuning.inner_opt.param_groups for p in group["params"]}
    assert tuned == {id(p) for p in tuning.model[-1].parameters()}
    assert tuning.override is None and tuning.step_override is None and tuning.proximal == 0.0
    meta_sgd = sinusoid.MetaSGDLearner(sinusoid.sinusoid_model(), config)
    names = {n for n, _ in meta_sgd.meta_sgd.named_parameters()}
    assert any(n.startswith("lrs.") for n in names) and len(list(meta_sgd.meta_parameters())) == 12
    meta_sgd.meta_step(SinusoidTasks(seed=0).sample(3), per_task=False)
    assert all(lr.grad is not None and lr.grad.abs().max() > 0 for lr in meta_sgd.meta_sgd.lrs)


def test_batched_evaluation_equals_the_per_task_evaluation():
    torch.manual_seed(0)
    model = sinusoid.sinusoid_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    outputs = {}
    for per_task in (True, False):
        config = sinusoid.SinusoidConfig(iterations=0, test_tasks=5, eval_steps=3, per_task=per_task)
        outputs[per_task] = sinusoid.evaluate(model, opt, config, torch.device("cpu"))
    (curves_a, shown_a), (curves_b, shown_b) = outputs[True], outputs[False]
    assert len(curves_a) == 5 and len(curves_a[0]) == 4
    torch.testing.assert_close(torch.tensor(curves_a), torch.tensor(curves_b), rtol=1e-10, atol=1e-12)
    assert len(shown_a["tasks"]) == 3
    for task_a, task_b in zip(shown_a["tasks"], shown_b["tasks"]):
        assert sorted(task_a["predictions"]) == [0, 1, 3]
        for step in (0, 1, 3):
            torch.testing.assert_close(task_a["predictions"][step], task_b["predictions"][step])
    # Fine-tuning lowers the query MSE on average, and step 0 is the unadapted model's MSE.
    assert torch.tensor(curves_b)[:, -1].mean() < torch.tensor(curves_b)[:, 0].mean()
    batch = SinusoidTasks(shots=10, query=100, seed=sinusoid.TEST_SEED).sample(5)
    with torch.no_grad():
        direct = sinusoid.task_mse(model(batch.query_x), batch.query_y)
    torch.testing.assert_close(torch.tensor([c[0] for c in curves_b]), direct)


def test_run_is_seeded_and_returns_the_printed_table(tmp_path, capsys):
    def run(seed, algorithm="maml"):
        config = sinusoid.SinusoidConfig(iterations=2, test_tasks=3, seed=seed, algorithm=algorithm)
        return sinusoid.run(config, torch.device("cpu"), tmp_path / "x.png", progress=False)

    first, again = run(4), run(4)
    assert first["table"] == again["table"] and run(5)["table"] != first["table"]
    assert list(run(4, "fomaml")["table"]) == ["first-order MAML", "pretrained"]
    assert is_png(tmp_path / "x.png")
    cell = first["table"]["MAML"]["1 step"]
    assert f"{cell['mean']:.3f} ± {cell['ci95']:.3f}" in capsys.readouterr().out
    assert first["mse_by_step"]["MAML"][1] == cell["mean"]
    assert set(first["timings"]) >= {"meta_training_s", "per_iteration_ms", "total_s"}


def test_defaults_are_the_papers_protocol():
    config = sinusoid.SinusoidConfig(iterations=sinusoid.DEFAULTS["iterations"])
    assert (config.iterations, config.shots, config.meta_batch, config.inner_lr, config.inner_steps) == (
        70000,
        10,
        25,
        0.01,
        1,
    )
    assert (config.meta_lr, config.test_tasks, config.eval_steps, config.per_task) == (1e-3, 600, 10, False)
    sizes = [tuple(p.shape) for p in sinusoid.sinusoid_model().parameters()]
    assert sizes == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]


def test_imaml_meta_gradient_is_imaml_step_and_the_run_improves_over_no_adaptation(tmp_path, capsys):
    from higher.algorithms import imaml_step

    config = sinusoid.SinusoidConfig(iterations=1, algorithm="imaml")
    batch = SinusoidTasks(seed=3).sample(4)
    torch.manual_seed(1)
    learner = sinusoid.IMAML(sinusoid.sinusoid_model(), config)
    loss = learner.meta_step(batch, per_task=False)
    torch.manual_seed(1)
    model = sinusoid.sinusoid_model()
    opt = torch.optim.Rprop(model.parameters(), lr=config.inner_lr)
    imaml = sinusoid.IMAML
    expected = imaml_step(
        model,
        opt,
        batch.tasks(),
        torch.nn.functional.mse_loss,
        imaml.default_inner_steps,
        reg=imaml.reg,
        cg_iterations=imaml.cg_iterations,
        cg_damping=imaml.cg_damping,
    )
    assert loss == pytest.approx(expected, rel=1e-5)  # float32: the batched and the per-task path
    for a, b in zip(learner.model.parameters(), model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # A tiny run: meta-trained a few iterations, then fine-tuned on the test tasks.
    run_config = sinusoid.SinusoidConfig(iterations=3, meta_batch=4, test_tasks=20, algorithm="imaml")
    record = sinusoid.run(run_config, torch.device("cpu"), tmp_path / "imaml.png", progress=False)
    assert "iMAML on sinusoid regression" in capsys.readouterr().out
    mse = record["mse_by_step"]["iMAML"]
    assert mse[-1] < mse[1] < mse[0] and is_png(tmp_path / "imaml.png")  # measured 3.73 -> 3.55 (10 steps)


# ------------------------------------------------------------------------------------ torch.compile
@pytest.fixture
def fresh_dynamo():
    """Compiled code and dynamo's counters of one test are not seen by the next."""
    from torch._dynamo.utils import counters

    torch.compiler.reset()
    counters.clear()
    yield counters
    torch.compiler.reset()


def small_sinusoid_model() -> torch.nn.Module:
    """The demo's network with one hidden layer instead of two: the same code paths (ANIL's body and
    head included), a smaller graph to trace (the trace grows with every layer)."""
    return torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))


COMPILED = sorted(a for a, learner in sinusoid.ALGORITHMS.items() if learner.compiles)


@needs_compile
@pytest.mark.parametrize(
    ("algorithm", "backward_inside"), [(a, True) for a in COMPILED] + [("maml", False), ("metasgd", False)]
)
def test_compiled_meta_step_gives_the_eager_meta_gradient_without_recompiling(algorithm, backward_inside, fresh_dynamo):
    """Three meta-iterations (new tasks, Adam-updated weights): the eager meta-gradients, one graph.

    ``backward_inside``: the demo's compiled meta-iteration (``higher.compiled.backward`` in the graph);
    without it, the compiled loss and ``.backward()`` outside (kept for the speed comparison).
    """
    config = sinusoid.SinusoidConfig(iterations=3, inner_steps=2, algorithm=algorithm)
    learners, meta_opts = [], []
    for compiled in (False, True):
        torch.manual_seed(1)
        learner = sinusoid.ALGORITHMS[algorithm](small_sinusoid_model(), config)
        if compiled:
            learner.compile("aot_eager", backward_inside=backward_inside)
        learners.append(learner)
        meta_opts.append(torch.optim.Adam(learner.meta_parameters(), lr=1e-2))
    sampler = SinusoidTasks(seed=3)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(config.iterations):
            batch = sampler.sample(5)
            losses = []
            for learner, meta_opt in zip(learners, meta_opts):
                meta_opt.zero_grad()
                losses.append(learner.meta_step(batch, per_task=False))
            assert losses[1] == pytest.approx(losses[0], rel=1e-10)
            eager, compiled = _grads(learners[0]), _grads(learners[1])
            assert all(g is not None for g in compiled) and len(compiled) == len(eager)
            for a, b in zip(compiled, eager):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
            for meta_opt in meta_opts:
                meta_opt.step()
    assert fresh_dynamo["stats"]["unique_graphs"] == 1


def test_compile_choice(monkeypatch):
    """Long task-batched CPU runs compile; short runs, --no-compile and eager-only paths do not."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(sinusoid._tracing, "compile_supported", lambda: True)  # on every torch, as on >= 2.11
    monkeypatch.setattr(sinusoid, "COMPILE_BY_DEFAULT", False)
    assert sinusoid.compile_choice(sinusoid.SinusoidConfig(iterations=70000), cpu)[0] is False
    assert sinusoid.compile_choice(sinusoid.SinusoidConfig(iterations=70000, compile=True), cpu)[0] is True
    monkeypatch.setattr(sinusoid, "COMPILE_BY_DEFAULT", True)

    def choice(**options):
        return sinusoid.compile_choice(sinusoid.SinusoidConfig(**options), cpu)

    assert choice(iterations=sinusoid.DEFAULTS["iterations"])[0] is True
    assert choice(iterations=sinusoid.COMPILE_FROM)[0] is True
    assert choice(iterations=sinusoid.COMPILE_FROM - 1)[0] is False
    assert choice(iterations=2) == (
        False,
        f"2 < {sinusoid.COMPILE_FROM} iterations: compiling would not pay; --compile compiles",
    )
    assert choice(iterations=70000, compile=False) == (False, "--no-compile")
    assert choice(iterations=2, compile=True) == (True, "--compile")
    for algorithm in ("maml", "fomaml", "metasgd", "anil"):
        assert choice(iterations=70000, algorithm=algorithm)[0] is True
    assert choice(iterations=70000, algorithm="imaml") == (False, "iMAML is not compiled")
    assert choice(iterations=70000, per_task=True)[0] is False
    assert sinusoid.compile_choice(sinusoid.SinusoidConfig(iterations=70000), torch.device("meta"))[0] is False
    for options in ({"algorithm": "imaml"}, {"per_task": True}):
        with pytest.raises(sinusoid.DemoError, match="leave out --compile"):
            choice(iterations=5, compile=True, **options)
    # A torch too old to compile inner loops (< 2.11): the run stays eager and says why; --compile is refused.
    monkeypatch.setattr(sinusoid._tracing, "compile_supported", lambda: False)
    too_old = f"torch {torch.__version__} cannot compile an inner loop (that needs torch >= 2.11)"
    assert choice(iterations=70000) == (False, too_old)
    assert choice(iterations=70000, compile=False) == (False, "--no-compile")
    with pytest.raises(
        sinusoid.DemoError, match=r"--compile: torch .* cannot compile .*>= 2\.11\); leave out --compile"
    ):
        choice(iterations=5, compile=True)


@needs_compile
@pytest.mark.parametrize("compile_option", [None, False])
def test_run_compiles_from_compile_from_iterations_unless_told_not_to(compile_option, tmp_path, monkeypatch):
    """With the threshold lowered to 2, a 2-iteration run compiles (and says so in the record) unless --no-compile."""
    compiled_calls = []
    original = sinusoid.Learner.compile

    def compile_(self, backend="inductor"):
        compiled_calls.append(backend)
        original(self, backend)

    monkeypatch.setattr(sinusoid.Learner, "compile", compile_)
    monkeypatch.setattr(sinusoid, "COMPILE_BACKEND", "aot_eager")
    config = sinusoid.SinusoidConfig(iterations=2, test_tasks=3, compile=compile_option)
    small = sinusoid.run(config, torch.device("cpu"), tmp_path / "x.png", progress=False)
    assert compiled_calls == [] and small["compile"]["used"] is False and small["compile"]["compile_s"] is None
    monkeypatch.setattr(sinusoid, "COMPILE_FROM", 2)
    monkeypatch.setattr(sinusoid, "COMPILE_BY_DEFAULT", True)
    torch.compiler.reset()
    record = sinusoid.run(config, torch.device("cpu"), tmp_path / "x.png", progress=False)
    used = record["compile"]
    if compile_option is False:
        assert compiled_calls == [] and used == {"used": False, "reason": "--no-compile", "compile_s": None}
    else:
        assert compiled_calls == ["aot_eager"] and used["used"] is True and used["reason"].startswith("2 >= 2")
        assert used["compile_s"] > 0 and record["timings"]["compile_s"] == used["compile_s"]
    # aot_eager runs eager's kernels (no reordered sums): the same table to the last digit either way.
    assert record["table"] == small["table"]
    torch.compiler.reset()


@needs_compile
def test_a_default_compilation_that_fails_runs_eagerly_and_says_why(tmp_path, monkeypatch, capsys):
    """No C++ compiler for inductor, say: compiling by default falls back to eager; --compile is an error."""

    def failing_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(sinusoid, "COMPILE_BACKEND", failing_backend)
    monkeypatch.setattr(sinusoid, "COMPILE_FROM", 2)
    monkeypatch.setattr(sinusoid, "COMPILE_BY_DEFAULT", True)
    cpu, png = torch.device("cpu"), tmp_path / "x.png"
    torch.compiler.reset()
    record = sinusoid.run(sinusoid.SinusoidConfig(iterations=2, test_tasks=3), cpu, png, progress=False)
    used = record["compile"]
    assert used["used"] is False and used["compile_s"] is None and record["timings"]["compile_s"] is None
    assert used["reason"].startswith("compilation failed (") and "no C++ compiler found" in used["reason"]
    assert "meta-training eagerly instead" in capsys.readouterr().out
    eager = sinusoid.run(sinusoid.SinusoidConfig(iterations=2, test_tasks=3, compile=False), cpu, png, progress=False)
    assert record["table"] == eager["table"]
    with pytest.raises(sinusoid.DemoError, match="--compile: torch.compile failed .*no C.. compiler found"):
        sinusoid.run(sinusoid.SinusoidConfig(iterations=2, test_tasks=3, compile=True), cpu, png, progress=False)
    torch.compiler.reset()
