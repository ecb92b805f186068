"""What differentiating through an inner loop needs to know about ``torch.compile``'s tracer.

The lowest layer of higher (it imports nothing of higher): whether dynamo is tracing the calling
code (:func:`tracing`), how an inner step's ``torch.autograd.grad`` stays in the traced graph
(:func:`autograd_in_graph`), how a fast weight becomes a fresh starting point inside a graph
(:func:`fresh_leaf`), and the guard against an inductor fusion that drops a scale
(:func:`_guard_addmm_fusion`). The optimizers use these at every step; :mod:`higher.compiled`
(the traced fmodel and :func:`higher.compiled.backward`) re-exports them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: The first torch release whose dynamo traces ``torch.autograd.grad`` into a graph (its option
#: ``trace_autograd_ops``), which compiling an inner loop needs: every inner step differentiates.
COMPILE_NEEDS_TORCH = "2.11"


def compile_supported() -> bool:
    """Whether this torch can compile an inner loop (see :data:`COMPILE_NEEDS_TORCH`); imports dynamo."""
    from torch._dynamo import config

    return hasattr(config, "trace_autograd_ops")


def _allow_patching_trace_autograd_ops() -> bool:
    """Let ``torch._dynamo.patch_dynamo_config`` accept ``trace_autograd_ops`` (see :func:`autograd_in_graph`),
    and guard inductor against pytorch/pytorch#167313 (see :func:`_guard_addmm_fusion`).

    Marked as a constant result (what ``torch.compiler.assume_constant_result`` marks, set here
    without importing dynamo, which would double ``import higher``'s time): dynamo runs it for
    real when it meets it while tracing, before the patch below is checked. On a torch without
    the option it raises the error that names the release needed (dynamo passes it on).
    """
    from torch._dynamo import decorators

    if not compile_supported():
        raise RuntimeError(
            f"torch.compile of an inner loop needs torch >= {COMPILE_NEEDS_TORCH} (its dynamo traces "
            f"torch.autograd.grad into the graph: the option trace_autograd_ops); this is torch "
            f"{torch.__version__}. Run the inner loop without torch.compile (everything else in higher "
            f"works on this torch), or upgrade torch."
        )

    allowed = decorators._allowed_config_patches
    if "trace_autograd_ops" not in allowed:
        decorators._allowed_config_patches = (*allowed, "trace_autograd_ops")
    _guard_addmm_fusion()
    return True


_allow_patching_trace_autograd_ops._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _guard_addmm_fusion() -> None:
    """Keep inductor from fusing ``add(x, mm(a, b), alpha=c)`` into ``addmm(x, a, b)``, which drops ``c``.

    torch 2.13's inductor (and earlier releases) has a post-grad pattern that rewrites an ``add`` of a
    matrix product and another tensor into one ``addmm``, ignoring the ``add``'s ``alpha``
    (pytorch/pytorch#167313). An inner step makes exactly such graphs: the gradient of a linear layer's
    weight is a matrix product, and the update rules add it, scaled, to the weights and the optimizer
    state; inductor's own decomposition of ``lerp`` turns ``lerp(zeros, g, w)`` (Adam's first moment at
    the first step) into ``add(zeros, g, alpha=w)``. Compiled per-task SGD took ``p - g`` instead of
    ``p - lr g``, and RAdam's first step lost ``1 - beta1``.

    The remedy is inductor's own extension point: a post-grad pass (``post_grad_custom_pre_pass``,
    which runs before the pattern passes) that writes each such ``add(x, y, alpha=c)`` as the equal
    ``sub(x, y, alpha=-c)``, which the fusion pattern does not match. It is added, next to any pass
    the user configured, when the first inner loop is compiled, so it applies to every graph inductor
    compiles in this process from then on (it changes no value: the same product, subtracted). Its
    ``uuid`` enters inductor's cache key, so artifacts compiled without it are not reused.
    """
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    global _KEEP_ALPHA
    if _KEEP_ALPHA is None:
        aten = torch.ops.aten

        class _KeepAlpha(CustomGraphPass):
            def __call__(self, graph: torch.fx.Graph) -> None:
                for node in graph.nodes:
                    if node.op != "call_function" or node.target is not aten.add.Tensor:
                        continue
                    alpha = node.kwargs.get("alpha", 1)
                    products = [
                        a for a in node.args[:2] if isinstance(a, torch.fx.Node) and a.target is aten.mm.default
                    ]
                    if alpha != 1 and products:
                        node.target = aten.sub.Tensor
                        node.kwargs = {**node.kwargs, "alpha": -alpha}

            def uuid(self) -> str:
                return "higher: add(x, mm, alpha) as sub(x, mm, -alpha), pytorch#167313, v1"

        _KEEP_ALPHA = _KeepAlpha()
    current = config.post_grad_custom_pre_pass
    passes = [] if current is None else list(current) if isinstance(current, (list, tuple)) else [current]
    if not any(p is _KEEP_ALPHA for p in passes):
        config.post_grad_custom_pre_pass = [_KEEP_ALPHA, *passes] if passes else _KEEP_ALPHA


_KEEP_ALPHA: Any = None


def autograd_in_graph() -> Any:
    """A context manager under which dynamo traces ``torch.autograd.grad`` into the graph.

    Dynamo breaks the graph at ``torch.autograd.grad`` unless ``trace_autograd_ops`` is set, and
    a function split there cannot be differentiated twice (AOTAutograd's compiled backward is not
    differentiable). ``torch._dynamo.patch_dynamo_config`` changes dynamo's configuration while
    it traces a block (and restores it after), so the inner step's gradient stays in the graph
    without touching the user's global configuration. It accepts a fixed list of options, which
    ``trace_autograd_ops`` is added to: the option only changes how dynamo traces (from the
    ``torch.autograd.grad`` call down), and dynamo still splits the graph where tracing it is
    unsafe (a loss whose graph reaches outside the compiled region), running it eagerly then.
    Called while tracing only (dynamo is imported then).
    """
    _allow_patching_trace_autograd_ops()
    return torch._dynamo.patch_dynamo_config(trace_autograd_ops=True)


def require_compile_support() -> None:
    """While dynamo traces an inner loop: refuse, naming the release needed, on a torch older than
    :data:`COMPILE_NEEDS_TORCH` (at ``innerloop_ctx``, before the first step would fail inside dynamo)."""
    _allow_patching_trace_autograd_ops()


def tracing() -> bool:
    """Whether ``torch.compile`` (dynamo) is tracing the calling code right now."""
    return torch.compiler.is_compiling()


class _Cut(torch.autograd.Function):
    """A copy of a tensor through which no gradient flows back (a fresh starting point)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        return tensor.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> None:
        return None


def fresh_leaf(tensor: Tensor, requires_grad: bool) -> Tensor:
    """``tensor.detach().requires_grad_(requires_grad)``: a new starting point for gradients.

    While dynamo traces, a tensor made to require grad inside the graph cannot be returned from it
    (nor anything computed from it); there the copy is the output of an autograd node that sends
    no gradient back instead, which differentiates the same for everything after it.
    """
    if not tracing():
        return tensor.detach().requires_grad_(requires_grad)
    if requires_grad and not tensor.requires_grad:
        raise NotImplementedError(
            "under torch.compile, a fast weight that requires grad must come from a tensor that requires grad."
        )
    return _Cut.apply(tensor) if requires_grad else tensor.detach()
