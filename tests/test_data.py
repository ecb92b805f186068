"""The offline task samplers: distributions, shapes, disjoint classes, seeding."""

import math

import pytest
import torch

from higher.data import DigitsTasks, SinusoidTasks, Task


def test_sinusoid_tasks_follow_the_papers_distribution():
    batch = SinusoidTasks(shots=10, seed=3).sample(4000)
    assert batch.support_x.shape == (4000, 10, 1) and batch.query_x.shape == (4000, 10, 1)
    assert batch.amplitude.shape == batch.phase.shape == (4000,)
    assert 0.1 <= batch.amplitude.min() and batch.amplitude.max() <= 5.0
    assert 0.0 <= batch.phase.min() and batch.phase.max() <= math.pi
    for x in (batch.support_x, batch.query_x):
        assert -5.0 <= x.min() and x.max() <= 5.0
    # Uniform, not just in range: the whole range is covered and the means are the midpoints.
    assert batch.amplitude.min() < 0.15 and batch.amplitude.max() > 4.95
    assert batch.phase.min() < 0.01 and batch.phase.max() > math.pi - 0.01
    assert batch.amplitude.mean().item() == pytest.approx(2.55, abs=0.06)
    assert batch.phase.mean().item() == pytest.approx(math.pi / 2, abs=0.04)
    assert batch.support_x.mean().item() == pytest.approx(0.0, abs=0.05)
    assert batch.support_x.std().item() == pytest.approx(10 / math.sqrt(12), rel=0.02)
    # y = A sin(x - phase), task by task.
    a, p = batch.amplitude[:, None, None], batch.phase[:, None, None]
    torch.testing.assert_close(batch.support_y, a * torch.sin(batch.support_x - p))
    torch.testing.assert_close(batch.query_y, a * torch.sin(batch.query_x - p))


def test_sinusoid_query_size_and_task_list():
    batch = SinusoidTasks(shots=5, query=7).sample(3)
    tasks = batch.tasks()
    assert len(tasks) == 3 and isinstance(tasks[0], Task)
    assert tasks[1].support_x.shape == (5, 1) and tasks[1].query_y.shape == (7, 1)
    assert torch.equal(tasks[2].query_x, batch.query_x[2])


def test_sinusoid_seeding_is_reproducible_and_independent_of_the_global_generator():
    first = SinusoidTasks(seed=11)
    torch.manual_seed(123)
    a = [first.sample(2), first.sample(2)]
    second = SinusoidTasks(seed=11)
    torch.manual_seed(456)
    state = torch.get_rng_state()
    b = [second.sample(2), second.sample(2)]
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is not used
    for x, y in zip(a, b):
        for tx, ty in zip(x, y):
            assert torch.equal(tx, ty)
    assert not torch.equal(a[0].amplitude, a[1].amplitude)
    assert not torch.equal(SinusoidTasks(seed=12).sample(2).amplitude, a[0].amplitude)


def test_sinusoid_bad_arguments():
    with pytest.raises(ValueError, match="shots"):
        SinusoidTasks(shots=0)
    with pytest.raises(ValueError, match="query"):
        SinusoidTasks(query=-1)
    with pytest.raises(ValueError, match="num_tasks"):
        SinusoidTasks().sample(0)
    with pytest.raises(ValueError, match="amplitude_range"):
        SinusoidTasks(amplitude_range=(5.0, 0.1))


def test_digits_meta_train_and_meta_test_classes_are_disjoint():
    train, test = DigitsTasks("train"), DigitsTasks("test")
    assert len(train.classes) == 20 and len(test.classes) == 16
    assert not set(train.classes) & set(test.classes)
    assert not {d for d, _ in train.classes} & {d for d, _ in test.classes}  # no digit in both, in any rotation
    # No image of a meta-test class appears among the meta-train images.
    train_images = torch.cat(train.images_by_class)
    for pool in test.images_by_class:
        distances = torch.cdist(pool, train_images)
        assert distances.min() > 0
    with pytest.raises(ValueError, match="disjoint"):
        DigitsTasks("train", train_digits=(0, 1, 2), test_digits=(2, 3))


def test_digits_rotations_make_classes():
    train = DigitsTasks("train")
    index = {c: i for i, c in enumerate(train.classes)}
    upright = train.images_by_class[index[(3, 0)]].reshape(-1, 8, 8)
    for quarter_turns in (1, 2, 3):
        turned = train.images_by_class[index[(3, quarter_turns)]].reshape(-1, 8, 8)
        assert torch.equal(turned, torch.rot90(upright, quarter_turns, dims=(1, 2)))
    assert 0.0 <= upright.min() and upright.max() <= 1.0


def test_digits_task_layout_and_labels():
    sampler = DigitsTasks("test", ways=4, shots=2, query=3, seed=5)
    task = sampler.sample()
    assert task.support_x.shape == (8, 64) and task.query_x.shape == (12, 64)
    assert task.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert task.query_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # All images of a label come from one class of this split (a different class per label),
    # and no image is used twice.
    pools = sampler.images_by_class
    classes = []
    for label in range(4):
        images = torch.cat([task.support_x[task.support_y == label], task.query_x[task.query_y == label]])
        assert len(torch.unique(images, dim=0)) == len(images)
        owners = [{i for i, pool in enumerate(pools) if (pool == img).all(dim=1).any()} for img in images]
        common = set.intersection(*owners)
        assert len(common) == 1
        classes.append(common.pop())
    assert len(set(classes)) == 4


def test_digits_seeding_is_reproducible():
    a, b, c = DigitsTasks(seed=1), DigitsTasks(seed=1), DigitsTasks(seed=2)
    ta, tb, tc = a.sample(), b.sample(), c.sample()
    for x, y in zip(ta, tb):
        assert torch.equal(x, y)
    assert not torch.equal(ta.support_x, tc.support_x)
    assert not torch.equal(ta.support_x, a.sample().support_x)


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        DigitsTasks("validation")
    with pytest.raises(ValueError, match="ways"):
        DigitsTasks("test", ways=17)
    with pytest.raises(ValueError, match="shots"):
        DigitsTasks(shots=0)
    with pytest.raises(ValueError, match="exceeds"):
        DigitsTasks(shots=100, query=100)


def test_digits_meta_validation_split_is_disjoint_from_the_others():
    digits = {"train_digits": (0, 1, 2), "val_digits": (3, 4), "test_digits": (5, 6, 7, 8)}
    splits = {split: DigitsTasks(split, ways=5, **digits) for split in ("train", "val", "test")}
    assert {d for d, _ in splits["val"].classes} == {3, 4} and len(splits["val"].classes) == 8
    assert len(splits["train"].classes) == 12 and len(splits["test"].classes) == 16
    for first in splits:
        for second in splits:
            if first != second:
                assert not set(splits[first].classes) & set(splits[second].classes)
    with pytest.raises(ValueError, match="val_digits"):
        DigitsTasks("val")
    with pytest.raises(ValueError, match="overlap"):
        DigitsTasks("train", train_digits=(0, 1, 2), val_digits=(2, 3))
    with pytest.raises(ValueError, match="overlap"):
        DigitsTasks("test", val_digits=(5,))


def test_digits_sample_batch_stacks_tasks_in_sampling_order():
    batch = DigitsTasks("test", ways=3, shots=2, query=4, seed=9).sample_batch(5)
    assert batch.support_x.shape == (5, 6, 64) and batch.query_y.shape == (5, 12)
    one_by_one = DigitsTasks("test", ways=3, shots=2, query=4, seed=9)
    for index in range(5):
        for stacked, single in zip(batch, one_by_one.sample()):
            assert torch.equal(stacked[index], single)
    with pytest.raises(ValueError, match="num_tasks"):
        DigitsTasks().sample_batch(0)
