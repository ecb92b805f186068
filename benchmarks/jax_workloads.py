"""The ``sine``, ``deep`` and ``conv`` workloads in JAX, written as a performance-minded JAX user writes MAML.

``jax.jit(jax.value_and_grad(meta_loss))`` where ``meta_loss`` is the mean over tasks
(``jax.vmap``, or ``jax.lax.map``: a loop over tasks in the compiled function, which XLA's CPU
convolutions run faster than the grouped convolutions that ``vmap`` of per-task weights gives) of the query loss after ``inner_steps`` differentiable inner steps taken with
``jax.grad`` (second order): plain SGD (``optax.sgd``; written out, ``p - lr * g``, where optax is
not installed: the same float32 numbers), or Adam written by hand with
torch.optim.Adam's math, exactly as ``benchmarks/implementations.adam_update`` (bias-corrected
moments, eps added after the bias correction, the same betas and eps; optax's ``adam`` is the same
math with other roundings). As there, the meta-gradient check uses a ``sqrt`` whose derivative at
0 is 0 (with the plain one, a dead ReLU unit makes the whole meta-gradient NaN: sine with Adam).

The layers are those of the torch models, with torch's layouts and conventions: ``nn.Linear``
(weight ``[out, in]``), ``nn.Conv2d`` (``jax.lax.conv_general_dilated``, NCHW/OIHW, stride 1,
symmetric zero padding), ``nn.BatchNorm2d`` without running statistics (the batch's mean and
biased variance over N, H, W, eps as torch's, affine weight and bias), ``nn.MaxPool2d``
(``jax.lax.reduce_window`` of ``max``, no padding: the floor of torch), ``nn.Flatten``, ReLU and
Tanh; the loss is the mean squared error (sine, deep) or the cross-entropy with integer labels
(conv: ``-log_softmax`` at the label, averaged).

JAX runs in a child process (``python benchmarks/jax_workloads.py --serve FILE``, started by
:class:`JaxRunner` with :func:`competitors.jax_environment`: CPU, one thread, unless told otherwise:
``benchmarks/gpu_check.py`` runs it on the GPU), so that the XLA flags
are set before JAX is imported and JAX never shares a process with torch. The parent hands it
the very weights and data of the torch benchmark (an ``.npz`` file: torch's ``nn.Linear``
initialisation, the same synthetic tasks), so that its meta-gradient can be compared with the
torch reference's to float32 precision. The child then answers one line per request on stdin:

- at start: ``{"compile_s", "loss", "grads"}``: the first call (trace + XLA compile + run) and
  its result, the meta-gradient flattened in the torch parameters' order;
- ``time``: runs one meta-iteration (jitted call + ``block_until_ready``) and answers its seconds;
- ``memory``: answers ``{"peak_bytes", "bytes_in_use"}`` of the device's allocator (``null`` where
  the backend keeps no statistics: CPU);
- ``quit``: exits.

This lets the parent interleave JAX's timed rounds with torch's, one at a time.
"""

from __future__ import annotations

import json
import math
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import competitors  # noqa: E402  (imports no torch)

BETAS, EPS = (0.9, 0.999), 1e-8  # as benchmarks/implementations.py
#: The workloads written here (their torch models are Sequentials of the layers below).
JAX_WORKLOADS = ("sine", "deep", "conv")


# ------------------------------------------------------------------ parent side (torch)
def export(
    model,
    data,
    path: Path,
    *,
    workload: str,
    optimizer: str,
    lr: float,
    steps: int,
    loss: str = "mse",
    tasks: str = "vmap",
) -> None:
    """Write ``model``'s layers and weights and the data to ``path`` (.npz) for the JAX child.

    ``loss``: ``"mse"`` or ``"cross_entropy"`` (integer labels); ``tasks``: ``"vmap"`` (``jax.vmap``
    over tasks) or ``"map"`` (``jax.lax.map``: one task after the other in the compiled loop). A layer the JAX side does not
    implement, or one configured otherwise than it assumes, raises ``ValueError``.
    """
    import numpy as np
    import torch
    from torch import nn

    layers: list = []
    arrays: dict = {}

    def add(*tensors) -> None:  # the parameters of one layer, in model.parameters() order
        i = sum(1 for layer in layers if isinstance(layer, dict) and "param" in layer)
        for k, tensor in enumerate(tensors):
            arrays[f"p{i}_{k}"] = tensor.detach().cpu().numpy()

    for module in model:
        if isinstance(module, nn.Linear) and module.bias is not None:
            add(module.weight, module.bias)
            layers.append({"kind": "linear", "param": 2})
        elif isinstance(module, nn.Conv2d) and module.bias is not None:
            if (
                module.stride != (1, 1)
                or module.dilation != (1, 1)
                or module.groups != 1
                or not isinstance(module.padding, tuple)
                or module.padding_mode != "zeros"
            ):
                raise ValueError(f"the JAX conv layer is stride 1, zero padding, one group, not {module}")
            add(module.weight, module.bias)
            layers.append({"kind": "conv", "param": 2, "padding": list(module.padding)})
        elif isinstance(module, nn.BatchNorm2d) and module.affine:
            if module.track_running_stats:
                raise ValueError("the JAX BatchNorm uses batch statistics only (track_running_stats=False)")
            add(module.weight, module.bias)
            layers.append({"kind": "batchnorm", "param": 2, "eps": module.eps})
        elif isinstance(module, nn.MaxPool2d):
            kernel, stride = module.kernel_size, module.stride
            if module.padding != 0 or module.dilation != 1 or module.ceil_mode or not isinstance(kernel, int):
                raise ValueError(f"the JAX max-pool has a square kernel, no padding, floor mode, not {module}")
            layers.append({"kind": "maxpool", "kernel": kernel, "stride": stride})
        elif isinstance(module, (nn.ReLU, nn.Tanh)):
            layers.append({"kind": type(module).__name__.lower()})
        elif isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            layers.append({"kind": "flatten"})
        else:
            raise ValueError(
                "the JAX workloads have Linear, Conv2d, BatchNorm2d (batch statistics), MaxPool2d, Flatten, "
                f"ReLU and Tanh layers only, not {module}"
            )
    if loss not in ("mse", "cross_entropy"):
        raise ValueError(f"loss must be 'mse' or 'cross_entropy', not {loss!r}")
    for name, tensor in zip(("support_x", "support_y", "query_x", "query_y"), data):
        arrays[name] = tensor.detach().cpu().numpy()
    if tasks not in ("vmap", "map"):
        raise ValueError(f"tasks must be 'vmap' or 'map', not {tasks!r}")
    config = {"workload": workload, "optimizer": optimizer, "lr": lr, "steps": steps, "layers": layers}
    config.update(loss=loss, tasks=tasks)
    config["x64"] = next(model.parameters()).dtype == torch.float64  # the float64 meta-gradient check
    config["safe_sqrt"] = config["x64"]
    np.savez(path, config=np.array(json.dumps(config)), **arrays)


class JaxRunner:
    """The JAX child process of one workload: compiles at start, then times one call per request.

    ``environment``: the child's environment (default :func:`competitors.jax_environment` of ``cpu``
    and ``xla_flags``); ``timeout``: seconds to wait for the first answer (the compile) before the
    child is stopped and :class:`TimeoutError` raised (default: no limit). The child's stderr goes
    to a temporary file (read back on failure), so that a chatty XLA never fills a pipe and blocks it.
    """

    def __init__(
        self,
        npz: Path,
        cpu: int | None = None,
        xla_flags: str = "",
        environment: dict[str, str] | None = None,
        timeout: float | None = None,
    ):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(npz)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=environment if environment is not None else competitors.jax_environment(cpu, xla_flags),
        )
        try:
            first = self._read(timeout)
        except BaseException:
            self.kill()
            raise
        self.compile_s: float = first["compile_s"]
        self.loss: float = first["loss"]
        self.grads: list[float] = first["grads"]

    def _read(self, timeout: float | None = None) -> dict:
        assert self.process.stdout is not None
        if timeout is not None and not select.select([self.process.stdout], [], [], max(timeout, 0))[0]:
            raise TimeoutError(f"the JAX child process did not answer within {timeout:.0f} s")
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=60)
            self.stderr.seek(0)
            raise RuntimeError("the JAX child process failed:\n" + self.stderr.read()[-3000:])
        return json.loads(line)

    def _ask(self, request: str) -> dict:
        assert self.process.stdin is not None
        self.process.stdin.write(request + "\n")
        self.process.stdin.flush()
        return self._read()

    def time_one(self) -> float:
        """Seconds of one meta-iteration in the child."""
        return self._ask("time")["seconds"]

    def memory(self) -> dict:
        """The child's device allocator: ``{"peak_bytes", "bytes_in_use"}``, ``None`` values on CPU."""
        return self._ask("memory")

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            self.process.wait(timeout=60)
        self.stderr.close()

    def kill(self) -> None:
        """Stop the child at once (a compile past its time, or a failed start)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=60)
        self.stderr.close()


# ------------------------------------------------------------------ child side (JAX)
def build(config: dict, arrays: dict):
    """The jitted ``value_and_grad`` of the meta-loss, its parameters and data (JAX arrays)."""
    jax = competitors.load_jax()
    if config["x64"]:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax import lax

    try:
        import optax
    except ImportError:  # a GPU image may have JAX without optax: SGD written out (optax.sgd's numbers)
        optax = None

    layers, steps, lr = config["layers"], config["steps"], config["lr"]
    n_param = sum(1 for layer in layers if "param" in layer)
    params = [tuple(jnp.asarray(arrays[f"p{i}_{k}"]) for k in range(2)) for i in range(n_param)]
    data = tuple(jnp.asarray(arrays[name]) for name in ("support_x", "support_y", "query_x", "query_y"))

    def forward(params, x):
        i = 0
        for layer in layers:
            kind = layer["kind"]
            if kind == "linear":
                w, b = params[i]
                x = x @ w.T + b  # torch's nn.Linear layout: weight [out, in]
            elif kind == "conv":
                w, b = params[i]
                (ph, pw) = layer["padding"]
                x = lax.conv_general_dilated(
                    x, w, (1, 1), ((ph, ph), (pw, pw)), dimension_numbers=("NCHW", "OIHW", "NCHW")
                )
                x = x + b[None, :, None, None]
            elif kind == "batchnorm":  # batch statistics: mean and biased variance over N, H, W
                w, b = params[i]
                mean = jnp.mean(x, axis=(0, 2, 3), keepdims=True)
                var = jnp.mean((x - mean) ** 2, axis=(0, 2, 3), keepdims=True)
                x = (x - mean) * lax.rsqrt(var + layer["eps"]) * w[None, :, None, None] + b[None, :, None, None]
            elif kind == "maxpool":
                k, st = layer["kernel"], layer["stride"]
                x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, k, k), (1, 1, st, st), "VALID")
            elif kind == "flatten":
                x = x.reshape(x.shape[0], -1)
            elif kind == "relu":
                x = jax.nn.relu(x)
            else:
                x = jnp.tanh(x)
            i += "param" in layer
        return x

    if config["loss"] == "mse":

        def loss(params, x, y):
            return jnp.mean((forward(params, x) - y) ** 2)

    else:  # cross-entropy with integer labels, as F.cross_entropy

        def loss(params, x, y):
            log_p = jax.nn.log_softmax(forward(params, x), axis=-1)
            return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=-1))

    def safe_sqrt(x):  # derivative 0 at 0 (see the module docstring)
        positive = x > 0
        return jnp.sqrt(jnp.where(positive, x, 1.0)) * positive

    sqrt = safe_sqrt if config["safe_sqrt"] else jnp.sqrt
    beta1, beta2 = BETAS

    def adam(fast, grads, state, step):  # torch.optim.Adam's math, as implementations.adam_update
        m, v = state
        m = jax.tree.map(lambda m, g: beta1 * m + (1 - beta1) * g, m, grads)
        v = jax.tree.map(lambda v, g: beta2 * v + (1 - beta2) * g * g, v, grads)
        bias_correction1, bias_correction2_sqrt = 1 - beta1**step, math.sqrt(1 - beta2**step)
        fast = jax.tree.map(
            lambda p, m, v: p - (lr / bias_correction1) * m / (sqrt(v) / bias_correction2_sqrt + EPS), fast, m, v
        )
        return fast, (m, v)

    sgd = optax.sgd(lr) if optax is not None else None

    def sgd_init(params):
        return sgd.init(params) if sgd is not None else ()

    def sgd_step(fast, grads, state):
        if sgd is None:  # optax.sgd's update is -lr * g, added to p: p - lr * g
            return jax.tree.map(lambda p, g: p - lr * g, fast, grads), state
        assert optax is not None
        updates, state = sgd.update(grads, state, fast)
        return optax.apply_updates(fast, updates), state

    def task_query_loss(params, sx, sy, qx, qy):
        fast = params
        state = sgd_init(params) if config["optimizer"] == "sgd" else jax.tree.map(jnp.zeros_like, (params, params))
        for step in range(1, steps + 1):
            grads = jax.grad(loss)(fast, sx, sy)
            if config["optimizer"] == "sgd":
                fast, state = sgd_step(fast, grads, state)
            else:
                fast, state = adam(fast, grads, state, step)
        return loss(fast, qx, qy)

    def meta_loss(params, sx, sy, qx, qy):
        if config["tasks"] == "map":  # a loop over tasks inside the compiled function
            losses = lax.map(lambda task: task_query_loss(params, *task), (sx, sy, qx, qy))
        else:
            losses = jax.vmap(task_query_loss, in_axes=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy)
        return jnp.mean(losses)

    return jax.jit(jax.value_and_grad(meta_loss)), params, data


def serve(npz: str) -> None:
    import numpy as np

    jax = competitors.load_jax()

    arrays = dict(np.load(npz))
    config = json.loads(str(arrays.pop("config")))
    meta_step, params, data = build(config, arrays)
    start = time.perf_counter()
    loss, grads = meta_step(params, *data)
    loss.block_until_ready()
    compile_s = time.perf_counter() - start
    flat = [float(v) for layer in grads for p in layer for v in np.asarray(p).ravel()]
    print(json.dumps({"compile_s": compile_s, "loss": float(loss), "grads": flat}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        if line.strip() == "memory":
            stats = jax.devices()[0].memory_stats() or {}
            answer = {"peak_bytes": stats.get("peak_bytes_in_use"), "bytes_in_use": stats.get("bytes_in_use")}
            print(json.dumps(answer), flush=True)
            continue
        start = time.perf_counter()
        loss, grads = meta_step(params, *data)
        loss.block_until_ready()
        for layer in grads:
            for p in layer:
                p.block_until_ready()
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(sys.argv[2])
    else:
        sys.exit("usage: benchmarks/jax_workloads.py --serve FILE.npz (started by benchmarks/compiled.py)")
