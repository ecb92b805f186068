"""The sinusoid demo's algorithms at their defaults: each is fine-tuned as it was meta-trained, and a
fine-tuning that diverges on a test task is counted in the table, never averaged in."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from higher.algorithms import imaml_step
from higher.data import SinusoidTasks
from higher.demos import sinusoid
from higher.demos.common import DemoError


def hand_written_fine_tuning(model, config, rates, proximal=0.0):
    """SGD written out on functional_call, one task at a time: step k uses ``rates(k)`` (a list of
    per-parameter learning rates, tensors or floats) on support MSE + proximal/2 |theta - theta_0|^2.
    Returns the query MSE after 0..eval_steps steps, per task."""
    batch = SinusoidTasks(shots=config.shots, query=config.test_query, seed=sinusoid.TEST_SEED).sample(
        config.test_tasks
    )
    names = [n for n, _ in model.named_parameters()]
    initial = [p.detach().clone() for p in model.parameters()]
    curves = []
    for support_x, support_y, query_x, query_y in batch.tasks():
        theta = [p.clone() for p in initial]
        mse = []
        for step in range(config.eval_steps + 1):
            params = dict(zip(names, theta))
            mse.append(float(F.mse_loss(functional_call(model, params, (query_x,)), query_y)))
            if step == config.eval_steps:
                break
            theta = [t.detach().requires_grad_() for t in theta]
            loss = F.mse_loss(functional_call(model, dict(zip(names, theta)), (support_x,)), support_y)
            loss = loss + proximal / 2 * sum(((t - t0) ** 2).sum() for t, t0 in zip(theta, initial))
            grads = torch.autograd.grad(loss, theta)
            theta = [(t - lr * g).detach() for t, g, lr in zip(theta, grads, rates(step))]
        curves.append(mse)
    return torch.tensor(curves)


def evaluate_as_the_demo_does(learner, config):
    tuning = learner.fine_tuning()
    curves, _ = sinusoid.evaluate(
        tuning.model,
        tuning.inner_opt,
        config,
        torch.device("cpu"),
        tuning.override,
        plot_tasks=0,
        step_override=tuning.step_override,
        proximal=tuning.proximal,
    )
    return torch.tensor(curves)


@pytest.mark.parametrize("per_task", [True, False])
def test_metasgd_fine_tunes_with_the_learned_rates_for_its_meta_trained_step_then_plain_sgd(per_task):
    config = sinusoid.SinusoidConfig(iterations=0, test_tasks=4, eval_steps=3, per_task=per_task, algorithm="metasgd")
    torch.manual_seed(0)
    learner = sinusoid.MetaSGDLearner(sinusoid.sinusoid_model(), config)
    assert learner.steps == 1  # the paper's one inner step, as meta-trained by default
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # learned rates that differ from inner_lr, weight by weight
        for lr in learner.meta_sgd.lrs:
            lr.copy_(0.05 * torch.rand(lr.shape, generator=generator, dtype=lr.dtype))
    learned = [lr.detach().clone() for lr in learner.meta_sgd.lrs]
    plain = [config.inner_lr] * len(learned)
    expected = hand_written_fine_tuning(learner.model, config, lambda step: learned if step < 1 else plain)
    torch.testing.assert_close(evaluate_as_the_demo_does(learner, config), expected, rtol=1e-5, atol=1e-6)
    # Neither the learned rates at every step nor plain SGD at every step gives these curves.
    for other in (lambda step: learned, lambda step: plain):
        assert not torch.allclose(expected, hand_written_fine_tuning(learner.model, config, other), rtol=1e-4)
    # With more meta-trained inner steps, as many fine-tuning steps use the learned rates.
    config_two = sinusoid.SinusoidConfig(
        iterations=0, test_tasks=4, eval_steps=3, per_task=per_task, algorithm="metasgd", inner_steps=2
    )
    learner.config, learner.steps = config_two, 2
    expected_two = hand_written_fine_tuning(learner.model, config_two, lambda step: learned if step < 2 else plain)
    torch.testing.assert_close(evaluate_as_the_demo_does(learner, config_two), expected_two, rtol=1e-5, atol=1e-6)


def test_anil_meta_trains_ten_inner_steps_of_the_head_and_fine_tunes_the_head_only():
    config = sinusoid.SinusoidConfig(iterations=0, test_tasks=3, eval_steps=2, algorithm="anil")
    assert config.inner_steps == sinusoid.ANIL.default_inner_steps == config.eval_steps + 8 == 10
    torch.manual_seed(0)
    learner = sinusoid.ANIL(sinusoid.sinusoid_model(), config)
    assert learner.steps == 10
    tuning = learner.fine_tuning()
    tuned = {id(p) for group in tuning.inner_opt.param_groups for p in group["params"]}
    assert tuned == {id(p) for p in list(learner.model.children())[-1].parameters()}
    head = len(list(learner.model.parameters())) - 2
    lr = config.inner_lr

    def rates(step):
        return [0.0] * head + [lr, lr]

    expected = hand_written_fine_tuning(learner.model, config, rates)
    torch.testing.assert_close(evaluate_as_the_demo_does(learner, config), expected, rtol=1e-5, atol=1e-6)
    # The meta-step runs 10 inner steps: its meta-loss is anil_step's with 10, not 1.
    from higher.algorithms import anil_step

    batch = SinusoidTasks(seed=2).sample(3)
    loss = learner.meta_step(batch, per_task=True)
    for steps, same in ((10, True), (1, False)):
        torch.manual_seed(0)
        again = sinusoid.ANIL(sinusoid.sinusoid_model(), config)
        reference = anil_step(again.body, again.head, again.head_opt, batch.tasks(), F.mse_loss, steps)
        assert (reference == pytest.approx(loss, rel=1e-6)) is same


def test_default_inner_steps_and_iterations_per_algorithm():
    steps = {name: sinusoid.SinusoidConfig(iterations=1, algorithm=name).inner_steps for name in sinusoid.ALGORITHMS}
    assert steps == {"maml": 1, "fomaml": 1, "metasgd": 1, "anil": 10, "imaml": 10}
    assert sinusoid.SinusoidConfig(iterations=1, algorithm="anil", inner_steps=3).inner_steps == 3
    assert sinusoid.IMAML.default_iterations < sinusoid.MAML.default_iterations == 70000


@pytest.mark.parametrize("per_task", [True, False])
def test_imaml_fine_tunes_on_its_proximal_inner_objective(per_task):
    """evaluate(proximal=c) steps on support MSE + c/2 |theta - theta_0|^2 (hand-written SGD here)."""
    config = sinusoid.SinusoidConfig(iterations=0, test_tasks=3, eval_steps=3, per_task=per_task)
    torch.manual_seed(0)
    model = sinusoid.sinusoid_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    curves, _ = sinusoid.evaluate(model, opt, config, torch.device("cpu"), plot_tasks=0, proximal=4.0)
    rates = [0.05] * len(list(model.parameters()))
    expected = hand_written_fine_tuning(model, config, lambda step: rates, proximal=4.0)
    torch.testing.assert_close(torch.tensor(curves), expected, rtol=1e-5, atol=1e-6)
    unregularised = hand_written_fine_tuning(model, config, lambda step: rates)
    assert not torch.allclose(expected[:, 2:], unregularised[:, 2:], rtol=1e-4)  # the term is there
    learner = sinusoid.IMAML(sinusoid.sinusoid_model(), sinusoid.SinusoidConfig(iterations=1, algorithm="imaml"))
    tuning = learner.fine_tuning()
    assert tuning.proximal == sinusoid.IMAML.reg and tuning.inner_opt is learner.inner_opt


def test_imaml_learner_reports_the_conjugate_gradient_and_its_meta_step_is_batched_imaml_step():
    config = sinusoid.SinusoidConfig(iterations=1, algorithm="imaml")
    batch = SinusoidTasks(seed=3).sample(4)
    torch.manual_seed(1)
    learner = sinusoid.IMAML(sinusoid.sinusoid_model(), config)
    assert learner.report() is None
    loss = learner.meta_step(batch, per_task=False)
    torch.manual_seed(1)
    model = sinusoid.sinusoid_model()
    stacked = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    imaml = sinusoid.IMAML
    expected = imaml_step(
        model,
        torch.optim.Rprop(model.parameters(), lr=config.inner_lr),
        stacked,
        F.mse_loss,
        imaml.default_inner_steps,
        reg=imaml.reg,
        cg_iterations=imaml.cg_iterations,
        batched=True,
        cg_damping=imaml.cg_damping,
    )
    assert loss == float(expected)
    for a, b in zip(learner.model.parameters(), model.parameters()):
        assert a.grad is not None and b.grad is not None and torch.equal(a.grad, b.grad)
    report = learner.report()
    assert report is not None and report["solves"] == 4
    assert report["cg_relative_residual"]["max"] == pytest.approx(expected.max_residual)
    assert report["inner_gradient_norm"]["max"] == pytest.approx(max(expected.inner_gradient_norms))


def test_imaml_negative_curvature_is_a_demo_error_that_names_the_settings(monkeypatch):
    """A loss whose Hessian is negative definite (MSE negated) with tiny reg and no damping: CG cannot
    solve, and the demo says which settings to change."""
    config = sinusoid.SinusoidConfig(iterations=1, algorithm="imaml")
    learner = sinusoid.IMAML(sinusoid.sinusoid_model(), config)
    monkeypatch.setattr(sinusoid.IMAML, "reg", 1e-6)
    monkeypatch.setattr(sinusoid.IMAML, "cg_damping", 0.0)
    monkeypatch.setattr(sinusoid.F, "mse_loss", lambda p, y: -((p - y) ** 2).mean())
    with pytest.raises(DemoError, match=r"non-positive curvature on task.*IMAML.reg = 1e-06"):
        learner.meta_step(SinusoidTasks(seed=3).sample(3), per_task=False)


# ---------------------------------------------------------------------------------- diverged tasks
def curves_with_divergence():
    finite = [[3.0, 1.0 + 0.1 * i, 0.5 + 0.01 * i] for i in range(5)]
    return finite + [[3.0, 2.0, math.nan], [3.0, 2.0, 1e9], [3.0, math.inf, math.inf]]


def test_table_counts_diverged_tasks_and_averages_the_others():
    config = sinusoid.SinusoidConfig(iterations=0, test_tasks=8, eval_steps=2)
    results = {"MAML": curves_with_divergence(), "pretrained": [[3.0, 2.0, 1.0]] * 8}
    text = sinusoid.table(results, config, {"MAML": "SGD", "pretrained": "SGD"})
    row = next(line for line in text.splitlines() if line.startswith("MAML "))
    assert "(1 diverged)" in row and "(3 diverged)" in row and "nan" not in row and "inf" not in row
    assert "diverged on k of the 8 test tasks" in text
    assert "diverged" not in next(line for line in text.splitlines() if line.startswith("pretrained "))
    cell = sinusoid.step_summary(results["MAML"], 2)
    assert (cell.diverged, cell.tasks) == (3, 8)
    assert cell.mean == pytest.approx(sum(0.5 + 0.01 * i for i in range(5)) / 5)
    one_step = sinusoid.step_summary(results["MAML"], 1)
    assert one_step.diverged == 1 and one_step.mean == pytest.approx((sum(1.0 + 0.1 * i for i in range(5)) + 4) / 7)
    clean = sinusoid.table({"pretrained": [[3.0, 2.0, 1.0]] * 8}, config)
    assert "diverged" not in clean


def test_run_records_diverged_counts_fine_tuning_and_meta_training(tmp_path, monkeypatch):
    def diverging(model, inner_opt, config, device, *args, **kwargs):
        curves = [[1.0] * (config.eval_steps + 1) for _ in range(config.test_tasks)]
        curves[0][-1] = math.nan
        return curves, {"grid": torch.zeros(1), "tasks": []}

    monkeypatch.setattr(sinusoid, "evaluate", diverging)
    monkeypatch.setattr(sinusoid, "plot", lambda *args, **kwargs: None)
    config = sinusoid.SinusoidConfig(iterations=1, meta_batch=2, test_tasks=3, algorithm="imaml")
    record = sinusoid.run(config, torch.device("cpu"), tmp_path / "x.png", progress=False)
    assert record["diverged_by_step"]["iMAML"] == [0] * config.eval_steps + [1]
    assert record["table"]["iMAML"]["10 steps"]["diverged"] == 1 and record["mse_by_step"]["iMAML"][-1] == 1.0
    assert "Rprop" in record["fine_tuning"]["iMAML"]
    assert record["meta_training"]["solves"] == 2
