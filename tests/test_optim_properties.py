"""Property-based tests: generated configurations against torch.optim and a hand-written unroll.

``hypothesis`` draws an optimizer and its options, a parameter-group layout over a chain of
blocks (groups with their own learning rates, empty groups, blocks that are frozen, unused by the
forward, trainable but left out of the optimizer, and a weight tied between two blocks), the
model's dtype, torch's default dtype, and the update path (multi-tensor or one-tensor). The
differentiable optimizer must then give torch.optim's parameters bitwise, and SGD's meta-gradients
must equal a hand-written ``functional_call`` unroll (tests/reference_unroll.py).

The examples are derandomized (the same ones on every run) so that CI is reproducible, and
capped so that the module runs in a few seconds.
"""

import copy

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import higher
from reference_unroll import higher_meta_grads, largest_gradient, max_difference, reference_meta_grads
from test_optim_parity import force_path

SETTINGS = settings(
    max_examples=100, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)

LR = st.sampled_from([0.01, 0.003])
BETAS = st.sampled_from([(0.9, 0.999), (0.8, 0.99)])
EPS = st.sampled_from([1e-8, 1e-3])
DECAY = st.sampled_from([0.0, 0.1])
FLAG = st.booleans()


@st.composite
def sgd_options(draw):
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    dampening = draw(st.sampled_from([0.0, 0.1]))
    nesterov = momentum > 0 and dampening == 0 and draw(FLAG)
    return dict(
        lr=draw(st.sampled_from([0.1, 0.03])),
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=draw(DECAY),
        maximize=draw(FLAG),
    )


OPTIONS = {
    "SGD": sgd_options(),
    "Adam": st.fixed_dictionaries(
        dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY, amsgrad=FLAG, maximize=FLAG, decoupled_weight_decay=FLAG)
    ),
    "AdamW": st.fixed_dictionaries(dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY, amsgrad=FLAG, maximize=FLAG)),
    "Adagrad": st.fixed_dictionaries(
        dict(
            lr=st.sampled_from([0.1, 0.03]),
            lr_decay=st.sampled_from([0.0, 0.01]),
            weight_decay=DECAY,
            initial_accumulator_value=st.sampled_from([0.0, 0.1]),
            eps=st.sampled_from([1e-10, 1e-6]),
            maximize=FLAG,
        )
    ),
    "Adadelta": st.fixed_dictionaries(
        dict(
            lr=st.sampled_from([1.0, 0.5]),
            rho=st.sampled_from([0.9, 0.8]),
            eps=st.sampled_from([1e-6, 1e-4]),
            weight_decay=DECAY,
            maximize=FLAG,
        )
    ),
    "Adamax": st.fixed_dictionaries(dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY, maximize=FLAG)),
    "ASGD": st.fixed_dictionaries(
        dict(
            lr=LR,
            lambd=st.sampled_from([1e-4, 0.01]),
            alpha=st.sampled_from([0.75, 0.5]),
            t0=st.sampled_from([1e6, 1.0]),
            weight_decay=DECAY,
            maximize=FLAG,
        )
    ),
    "RMSprop": st.fixed_dictionaries(
        dict(
            lr=LR,
            alpha=st.sampled_from([0.99, 0.9]),
            eps=EPS,
            weight_decay=DECAY,
            momentum=st.sampled_from([0.0, 0.5]),
            centered=FLAG,
            maximize=FLAG,
        )
    ),
    "Rprop": st.fixed_dictionaries(
        dict(
            lr=LR,
            etas=st.sampled_from([(0.5, 1.2), (0.3, 1.5)]),
            step_sizes=st.sampled_from([(1e-6, 50.0), (1e-4, 0.05)]),
            maximize=FLAG,
        )
    ),
    "NAdam": st.fixed_dictionaries(
        dict(
            lr=LR,
            betas=BETAS,
            eps=EPS,
            weight_decay=DECAY,
            momentum_decay=st.sampled_from([4e-3, 0.01]),
            decoupled_weight_decay=FLAG,
            maximize=FLAG,
        )
    ),
    "RAdam": st.fixed_dictionaries(
        dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY, decoupled_weight_decay=FLAG, maximize=FLAG)
    ),
}

ROLES = ["group0", "group1", "group2", "frozen", "unused", "outside"]  # outside: trainable, not optimized
DTYPES = st.sampled_from([torch.float32, torch.float64])


class Chain(nn.Module):
    """Blocks applied in turn (``tanh`` between them), skipping those marked unused."""

    def __init__(self, blocks, used, tie):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(3, 3) for _ in range(blocks))
        self.used = used
        if tie:  # the last block's weight is the second block's (one tensor, two slots)
            self.blocks[-1].weight = self.blocks[1].weight

    def forward(self, x):
        for block, used in zip(self.blocks, self.used):
            if used:
                x = torch.tanh(block(x))
        return x


@st.composite
def layouts(draw):
    roles = draw(st.lists(st.sampled_from(ROLES), min_size=4, max_size=4))
    tie = draw(FLAG)
    lr_scales = draw(st.lists(st.sampled_from([1.0, 0.5]), min_size=3, max_size=3))
    return roles, tie, lr_scales


def _build(roles, tie, model_dtype):
    model = Chain(len(roles), [role != "unused" for role in roles], tie).to(model_dtype)
    for block, role in zip(model.blocks, roles):
        if role == "frozen":
            for p in block.parameters():
                p.requires_grad_(False)
    return model


def _groups(model, roles, lr_scales, lr):
    groups = [{"params": [], "lr": lr * scale} for scale in lr_scales]
    seen = set()
    for block, role in zip(model.blocks, roles):
        for p in block.parameters():
            if id(p) in seen:
                continue  # a tied weight belongs to the first block that has it
            seen.add(id(p))
            if role.startswith("group") or role == "unused":
                groups[int(role[-1]) if role.startswith("group") else 0]["params"].append(p)
    return groups


def _receives_gradient(roles):
    return any(role.startswith("group") for role in roles)


@SETTINGS
@given(
    name=st.sampled_from(sorted(OPTIONS)),
    data=st.data(),
    layout=layouts(),
    model_dtype=DTYPES,
    default_dtype=DTYPES,
    path=st.sampled_from(["multi_tensor", "one_tensor"]),
    steps=st.integers(1, 3),
)
def test_generated_configurations_match_torch_optim(name, data, layout, model_dtype, default_dtype, path, steps):
    roles, tie, lr_scales = layout
    assume(_receives_gradient(roles))
    options = data.draw(OPTIONS[name], label="options")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        torch.manual_seed(0)
        model = _build(roles, tie, model_dtype)
        x, y = torch.randn(5, 3, dtype=model_dtype), torch.randn(5, 3, dtype=model_dtype)
        reference = copy.deepcopy(model)
        opt_type = getattr(torch.optim, name)
        torch_opt = opt_type(_groups(reference, roles, lr_scales, options["lr"]), **options)
        for _ in range(steps):
            torch_opt.zero_grad()
            nn.functional.mse_loss(reference(x), y).backward()
            torch_opt.step()
        with pytest.MonkeyPatch.context() as monkeypatch:
            if higher.optim._opt_mapping[opt_type].rule.update_many is not None:
                force_path(monkeypatch, opt_type, path)
            opt = opt_type(_groups(model, roles, lr_scales, options["lr"]), **options)
            with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(nn.functional.mse_loss(fmodel(x), y))
        for ours, theirs in zip(fmodel.parameters(), reference.parameters()):
            assert ours.dtype == theirs.dtype
            assert torch.equal(ours, theirs), f"max difference {(ours - theirs).abs().max().item()}"
        for original, kept in zip(model.parameters(), reference.parameters()):
            if not any(original is p for g in opt.param_groups for p in g["params"]):
                assert torch.equal(original, kept)
    finally:
        torch.set_default_dtype(previous)


@settings(max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(
    roles=st.lists(st.sampled_from(["used", "frozen", "unused"]), min_size=3, max_size=4),
    tie=FLAG,
    model_dtype=DTYPES,
    default_dtype=DTYPES,
    steps=st.integers(1, 4),
    path=st.sampled_from(["multi_tensor", "one_tensor"]),
)
def test_generated_sgd_unrolls_match_a_hand_written_unroll(roles, tie, model_dtype, default_dtype, steps, path):
    assume("used" in roles and (not tie or roles[1] != "frozen" or roles[-1] != "unused"))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        torch.manual_seed(0)
        model = _build(
            ["frozen" if r == "frozen" else ("unused" if r == "unused" else "group0") for r in roles], tie, model_dtype
        )
        assume(any(p.requires_grad for block, r in zip(model.blocks, roles) if r == "used" for p in block.parameters()))
        x, y = torch.randn(6, 3, dtype=model_dtype), torch.randn(6, 3, dtype=model_dtype)
        xq, yq = torch.randn(6, 3, dtype=model_dtype), torch.randn(6, 3, dtype=model_dtype)
        kwargs = dict(steps=steps, support_target=y, query_target=yq, lr=0.1)
        with pytest.MonkeyPatch.context() as monkeypatch:
            force_path(monkeypatch, torch.optim.SGD, path)
            loss, ours = higher_meta_grads(model, (x,), (xq,), **kwargs)
        reference_loss, theirs = reference_meta_grads(model, (x,), (xq,), **kwargs)
        tolerance = 1e-12 if model_dtype == torch.float64 else 1e-5
        scale = max(largest_gradient(theirs), 1.0)
        assert max_difference(ours, theirs) <= tolerance * scale
        assert abs(float(loss) - float(reference_loss)) <= tolerance * max(1.0, abs(float(reference_loss)))
    finally:
        torch.set_default_dtype(previous)
