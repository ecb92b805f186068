"""higher.utils: 0.2.1's helpers (public and the private ones published code imports), with 0.2.1's
behaviour, and the random-state helpers the hypergradient methods use to replay dropout masks."""

import torch
from torch import nn

import higher
from higher.utils import get_random_state, random_devices, set_random_state


def test_recursive_map_and_copy_and_cast():
    from higher.utils import _recursive_copy_and_cast, _recursive_map

    nested = {"a": [1, (2, 3)], "b": {4}}
    assert _recursive_map(nested, lambda v: v * 10) == {"a": [10, (20, 30)], "b": {40}}
    assert type(_recursive_map((1, 2), str)) is tuple
    t = torch.randn(2, requires_grad=True)
    copied = _recursive_copy_and_cast({"w": [t], "n": 3}, None)
    assert copied["n"] == 3
    c = copied["w"][0]
    assert c is not t and torch.equal(c, t) and c.is_leaf and c.requires_grad
    assert c.data_ptr() != t.data_ptr()


def test_copy_tensor_flatten_and_container_checks():
    from higher.utils import _copy_tensor, _is_container, flatten

    t = torch.randn(3, requires_grad=True)
    safe, shared = _copy_tensor(t, True), _copy_tensor(t, False)
    assert safe.data_ptr() != t.data_ptr() and shared.data_ptr() == t.data_ptr()
    assert safe.is_leaf and safe.requires_grad and shared.is_leaf and shared.requires_grad
    assert flatten({"a": [1, (2, {3})], "b": 4}) == [1, 2, 3, 4]
    assert [_is_container(v) for v in ([], (), {}, set(), "s", torch.zeros(1))] == [True] * 4 + [False] * 2


def test_get_func_params_detached_copies():
    model = nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    params = higher.utils.get_func_params(model)
    assert [p.requires_grad for p in params] == [True, False]
    assert all(p.is_leaf and p.data_ptr() != q.data_ptr() for p, q in zip(params, model.parameters()))


def test_param_mapping_of_tied_weights():
    from higher.utils import _find_param_in_list, _get_param_mapping

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.out = nn.Linear(3, 5)
            self.out.weight = self.embed.weight
            self.again = self.out  # a shared submodule: its slots are visited again

    model = Tied()
    seen = []
    mapping = _get_param_mapping(model, seen, [])
    assert mapping == [0, 0, 1, 0, 1]
    assert seen[0] is model.embed.weight and seen[1] is model.out.bias
    assert len(seen) == len(list(model.parameters()))
    assert _find_param_in_list(model.out.bias, seen) == 1
    assert _find_param_in_list(torch.zeros(1), seen) is None


def test_random_state_round_trip_replays_the_same_draws():
    """forward_hypergradient replays each pass's dropout masks with these: a restored state must
    give the same draws, and the devices are those of the tensors given (none on CPU)."""
    tensors = [torch.randn(3)]
    devices = random_devices(tensors)
    assert devices == []
    state = get_random_state(devices)
    first = torch.rand(5)
    set_random_state(state, devices)
    assert torch.equal(torch.rand(5), first)
    assert not torch.equal(torch.rand(5), first)
