"""The digits experiment: batched equals per-task, the fair choice of fine-tuning, the run."""

import pytest
import torch

from higher.data import Task
from higher.demos import digits

from .helpers import is_png


def _small_config(**options):
    return digits.DigitsConfig(iterations=2, ways=3, test_tasks=4, val_tasks=4, **options)


def test_batched_training_equals_the_per_task_path():
    models = {}
    for per_task in (True, False):
        config = _small_config(per_task=per_task, train_steps=2, meta_batch=3)
        models[per_task], _ = digits.train_maml(config, digits.samplers(config)["train"], torch.device("cpu"), False)
    for a, b in zip(models[True].parameters(), models[False].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.manual_seed(0)  # the initialisation train_maml starts from (seed 0)
    fresh = digits.digits_model(3)
    assert not torch.equal(next(models[False].parameters()), next(fresh.parameters()))


def test_batched_accuracy_curves_equal_the_per_task_ones():
    config = _small_config()
    batch = digits.samplers(config)["test"].sample_batch(4)
    model = digits.digits_model(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    a = digits.accuracy_curves(model, opt, batch, 3, per_task=True)
    b = digits.accuracy_curves(model, opt, batch, 3, per_task=False)
    assert a == b and len(a) == 4 and len(a[0]) == 4
    with torch.no_grad():
        direct = digits.accuracy(model(batch.query_x), batch.query_y)
    assert [c[0] for c in b] == direct.tolist()


def test_head_only_fine_tuning_leaves_the_body_fixed():
    model = digits.digits_model(3)
    opt = digits.fine_tuning_opt(model, 0.1, head_only=True)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model[-1].parameters()}
    assert len(digits.fine_tuning_opt(model, 0.1, head_only=False).param_groups[0]["params"]) == 6


def test_choice_is_the_best_validation_setting_of_the_same_grid_for_both():
    config = _small_config(lr_grid=(0.01, 0.3, 1.0))
    val = digits.samplers(config)["val"].sample_batch(6)
    torch.manual_seed(0)
    a, b = digits.digits_model(3), digits.digits_model(3)
    chosen, tried = digits.choose_fine_tuning({"A": (a, [False]), "B": (b, [False, True])}, val, config)
    assert [(t["method"], t["lr"], t["head_only"]) for t in tried] == [
        ("A", 0.01, False),
        ("A", 0.3, False),
        ("A", 1.0, False),
        *[("B", lr, head_only) for head_only in (False, True) for lr in (0.01, 0.3, 1.0)],
    ]
    for name in ("A", "B"):
        best = max(t["accuracy"] for t in tried if t["method"] == name)
        assert chosen[name]["accuracy"] == best
        # the reported accuracy is the validation accuracy after eval_steps with that setting
        opt = digits.fine_tuning_opt(a if name == "A" else b, chosen[name]["lr"], chosen[name]["head_only"])
        curves = digits.accuracy_curves(a if name == "A" else b, opt, val, config.eval_steps, False)
        assert sum(c[-1] for c in curves) / len(curves) == pytest.approx(best)


def test_run_prints_choice_and_table_and_writes_png(tmp_path, capsys):
    out = tmp_path / "digits.png"
    record = digits.run(_small_config(), torch.device("cpu"), out, progress=False)
    printed = capsys.readouterr().out
    assert "accuracy (%) on 4 test tasks (3-way 1-shot" in printed
    assert "fine-tuning chosen on 4 meta-validation tasks" in printed
    assert set(record["chosen"]) == {"MAML", "pretrained"} and record["chosen"]["MAML"]["head_only"] is False
    assert len(record["validation"]) == 3 * len(digits.LR_GRID)
    assert list(record["table"]["MAML"]) == ["0 steps", "1 step", "5 steps", "10 steps"]
    assert is_png(out)
    # The zero-initialised head predicts class 0 everywhere before fine-tuning.
    assert record["table"]["pretrained"]["0 steps"]["mean"] == pytest.approx(100 / 3)


def test_samplers_split_the_classes_and_reject_impossible_tasks():
    splits = digits.samplers(_small_config())
    assert {d for d, _ in splits["train"].classes} == set(digits.TRAIN_DIGITS)
    assert {d for d, _ in splits["val"].classes} == set(digits.VAL_DIGITS)
    assert {d for d, _ in splits["test"].classes} == set(digits.TEST_DIGITS)
    with pytest.raises(digits.DemoError, match="exceeds"):
        digits.samplers(_small_config(shots=170))
    with pytest.raises(digits.DemoError, match="at most 8"):
        digits.run(digits.DigitsConfig(iterations=0, ways=9), torch.device("cpu"), None, False)  # type: ignore[arg-type]
    assert isinstance(splits["test"].sample_batch(2), Task)
