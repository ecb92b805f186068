"""Draw docs/meta-gradients.png: the fast-weight history and where the meta-gradient goes.

Run: python docs/make_diagram.py   (needs matplotlib: pip install 'higher[demo]')

Three rows, one per configuration of ``innerloop_ctx``. Boxes are tensors: the model's
parameters ``W`` and the fast weights ``fmodel.parameters(time=t)``; black arrows are the
forward computation (``diffopt.step`` makes time t+1 from time t and the support loss); red
dashed arrows are the paths of the meta-gradient in ``meta_loss.backward()``; a red cross is
where the graph is cut.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parent / "meta-gradients.png"
STEPS = 3
BOX_W, BOX_H = 1.95, 0.62
FORWARD = dict(arrowstyle="-|>", color="black", lw=1.3, mutation_scale=12)
BACKWARD = dict(arrowstyle="-|>", color="tab:red", lw=1.8, ls=(0, (4, 2)), mutation_scale=14)


def box(ax, x, y, text, color="#e8eef7", edge="#4a6fa5"):
    ax.add_patch(
        FancyBboxPatch(
            (x - BOX_W / 2, y - BOX_H / 2), BOX_W, BOX_H, boxstyle="round,pad=0.03", fc=color, ec=edge, lw=1.2
        )
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=9)


def arrow(ax, start, end, style, text=None, text_offset=(0, 0.14), rad=0.0, fontsize=7.5):
    ax.annotate(
        "", xy=end, xytext=start, arrowprops={**style, "connectionstyle": f"arc3,rad={rad}", "shrinkA": 2, "shrinkB": 2}
    )
    if text:
        mid = ((start[0] + end[0]) / 2 + text_offset[0], (start[1] + end[1]) / 2 + text_offset[1])
        ax.text(*mid, text, ha="center", va="bottom", fontsize=fontsize, color=style["color"])


def cut(ax, x, y):
    ax.text(x, y, "✕", ha="center", va="center", fontsize=16, color="tab:red", fontweight="bold")


def row(ax, title, copy_initial_weights, track_higher_grads, notes, first_order=False):
    ax.set_xlim(-1.3, 16.0)
    ax.set_ylim(-1.95, 1.6)
    ax.axis("off")
    ax.set_title(title, loc="left", fontsize=11, fontweight="bold")
    y = 0.0
    xs = [2.95 + 2.95 * t for t in range(STEPS + 1)]
    half = BOX_W / 2
    box(ax, 0.0, y, "model.parameters()\nW  (leaf)", color="#fdf1dc", edge="#b8860b")
    for t, x in enumerate(xs):
        if track_higher_grads:
            label = f"fmodel.parameters(\n  time={t})"
        elif t == STEPS:
            label = "fmodel.parameters()\n(latest, a leaf)"
        else:
            label = f"time={t}\n(not kept)"
        box(ax, x, y, label + ("\n= W.clone()" if t == 0 and not copy_initial_weights else ""), color="#e8eef7")
    loss_x = xs[-1] + 2.85
    box(ax, loss_x, y, "meta_loss\n(query loss)", color="#f5e1e1", edge="#a33")
    # forward
    arrow(
        ax,
        (half, y + 0.12),
        (xs[0] - half, y + 0.12),
        FORWARD,
        "clone" if not copy_initial_weights else "clone + detach",
    )
    step_label = "step (g constant)" if first_order else "diffopt.step"
    for t in range(STEPS):
        arrow(ax, (xs[t] + half, y + 0.12), (xs[t + 1] - half, y + 0.12), FORWARD, step_label)
    arrow(ax, (xs[-1] + half, y + 0.12), (loss_x - half, y + 0.12), FORWARD, "fmodel(x_query)")
    # backward
    back_y = y - 0.2
    arrow(ax, (loss_x - half, back_y), (xs[-1] + half, back_y), BACKWARD)
    if track_higher_grads:
        for t in range(STEPS, 0, -1):
            style = BACKWARD | {"color": "tab:purple"} if first_order else BACKWARD
            arrow(ax, (xs[t] - half, back_y), (xs[t - 1] + half, back_y), style)
        if copy_initial_weights:
            cut(ax, (half + xs[0] - half) / 2, back_y)
        else:
            arrow(ax, (xs[0] - half, back_y), (half, back_y), BACKWARD)
    else:
        for t in range(STEPS, 0, -1):
            cut(ax, (xs[t] - half + xs[t - 1] + half) / 2, back_y)
        cut(ax, (half + xs[0] - half) / 2, back_y)
    # hyperparameters
    if track_higher_grads and not first_order:
        hx = (xs[0] + xs[-1]) / 2
        ax.text(
            hx,
            1.22,
            "override={'lr': lr, 'momentum': m}  (tensors)",
            ha="center",
            va="center",
            fontsize=8.5,
            bbox={"boxstyle": "round", "fc": "#eef6ee", "ec": "#5a5"},
        )
        for t in range(STEPS):
            mid = (xs[t] + xs[t + 1]) / 2
            arrow(ax, (hx + 0.4 * (t - 1), 1.08), (mid - 0.15, 0.36), FORWARD | {"color": "#5a5", "lw": 0.8})
            arrow(ax, (mid + 0.15, 0.36), (hx + 0.4 * (t - 1) + 0.3, 1.08), BACKWARD | {"lw": 1.0})
    for i, note in enumerate(notes):
        ax.text(-1.2, -1.4 - 0.28 * i, note, ha="left", va="center", fontsize=8.8)


def main(out: Path = OUT) -> None:
    fig, axes = plt.subplots(4, 1, figsize=(14, 13.5))
    row(
        axes[0],
        "MAML: innerloop_ctx(model, opt, copy_initial_weights=False)   (track_higher_grads=True)",
        copy_initial_weights=False,
        track_higher_grads=True,
        notes=[
            "meta_loss.backward() goes back through every step and the clone into W: model.parameters()' .grad "
            "is the MAML meta-gradient (second order), ready for meta_opt.step().",
            "Hyperparameters given as tensors through override receive their hypergradients on the same pass.",
        ],
    )
    row(
        axes[1],
        "Default: innerloop_ctx(model, opt)   (copy_initial_weights=True, track_higher_grads=True)",
        copy_initial_weights=True,
        track_higher_grads=True,
        notes=[
            "time=0 is a detached copy: backward() stops there and model.parameters()' .grad stays None.",
            "Take the gradient explicitly: torch.autograd.grad(meta_loss, fmodel.parameters(time=0)).",
        ],
    )
    row(
        axes[2],
        "First-order MAML: innerloop_ctx(model, opt, copy_initial_weights=False, first_order=True)",
        copy_initial_weights=False,
        track_higher_grads=True,
        first_order=True,
        notes=[
            "Inner gradients g are taken without a graph (no second derivatives), but each step is still "
            "W_t+1 = W_t - lr * g_t: backward() goes along",
            "the chain with identity Jacobians (purple) into W: model.parameters()' .grad is the gradient at the "
            "adapted weights, the first-order MAML gradient.",
        ],
    )
    row(
        axes[3],
        "No graph (evaluation): innerloop_ctx(model, opt, track_higher_grads=False)",
        copy_initial_weights=True,
        track_higher_grads=False,
        notes=[
            "Each step's result is a fresh leaf: no graph through the steps, only the latest weights are kept.",
            "backward() stops at the latest fast weights (their .grad); nothing reaches W or the hyperparameters.",
        ],
    )
    fig.text(
        0.01,
        0.005,
        "black: forward computation    red dashed: meta-gradient in backward()    purple: first-order path    ✕: graph cut",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
