"""Where the train step's time goes on this CPU: its convolutions, ours against PyTorch's.

  python benchmarks/conv_profile.py [--batch=32] [--repeats=10]

Reads every convolution of the benchmark U-Net's forward pass off its jaxpr (input and
kernel shapes, strides, padding), then times each distinct one forwards and forwards plus
backwards (the gradients of input and kernel, as a train step takes them) under `jax.jit` and
in eager PyTorch (oneDNN), side by side. Weighted by how often each occurs, the sums are the
time the two frameworks' train steps spend in convolutions; benchmarks/train_step.py gives
the whole step. Timing is the median of the repeats, never a test. Prints a table and one JSON
line.
"""

from __future__ import annotations

import collections
import json
import time

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags
from common import benchmark_inputs, benchmark_unets

_BATCH = flags.DEFINE_integer("batch", 32, "Latents per step.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per convolution and framework.")


def unet_convolutions(unet, params, inputs) -> collections.Counter:
    """(input shape, kernel shape, strides, padding) of each convolution -> its count."""
    jaxpr = jax.make_jaxpr(unet.apply)(
        {"params": params}, inputs["latents"], inputs["timesteps"], inputs["context"]
    )
    found = collections.Counter()

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                lhs, rhs = (v.aval.shape for v in eqn.invars)
                padding = tuple(tuple(p) for p in eqn.params["padding"])
                found[(lhs, rhs, tuple(eqn.params["window_strides"]), padding)] += 1
        for sub in jax.extend.core.subjaxprs(jaxpr):  # inside jit, remat, scan
            visit(sub)

    visit(jaxpr.jaxpr)
    return found


def median_ms(run, repeats: int) -> float:
    run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return 1e3 * float(np.median(seconds))


def time_jax(lhs, rhs, strides, padding, repeats) -> tuple[float, float]:
    x = jnp.asarray(np.random.default_rng(0).standard_normal(lhs, dtype=np.float32))
    w = jnp.asarray(np.random.default_rng(1).standard_normal(rhs, dtype=np.float32))

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    forward = jax.jit(conv)
    gradients = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
    return (
        median_ms(lambda: forward(x, w).block_until_ready(), repeats),
        median_ms(lambda: jax.block_until_ready(gradients(x, w)), repeats),
    )


def time_torch(lhs, rhs, strides, padding, repeats) -> tuple[float, float]:
    batch, height, width, channels = lhs
    x = torch.randn(batch, channels, height, width, requires_grad=True)
    w = torch.randn(rhs[3], rhs[2], rhs[0], rhs[1], requires_grad=True)
    (top, bottom), (left, right) = padding
    if top != bottom or left != right:  # an asymmetric pad: torch pads explicitly first

        def conv(x):
            return torch.nn.functional.conv2d(
                torch.nn.functional.pad(x, (left, right, top, bottom)), w, stride=strides
            )
    else:

        def conv(x):
            return torch.nn.functional.conv2d(x, w, stride=strides, padding=(top, left))

    def forward():
        with torch.inference_mode():
            conv(x)

    def gradients():
        (conv(x) ** 2).sum().backward()

    return median_ms(forward, repeats), median_ms(gradients, repeats)


def main(_):
    _, unet, params = benchmark_unets()
    inputs = benchmark_inputs(_BATCH.value)
    convolutions = unet_convolutions(unet, params, inputs)
    print(
        f"{'input':<18} {'kernel':<16} {'stride':>6} {'n':>2} {'jax fwd':>8} {'torch fwd':>9} "
        f"{'jax f+b':>8} {'torch f+b':>9} {'ratio f+b':>9}"
    )
    totals = collections.Counter()
    rows = []
    for (lhs, rhs, strides, padding), count in sorted(convolutions.items()):
        jax_fwd, jax_grad = time_jax(lhs, rhs, strides, padding, _REPEATS.value)
        torch_fwd, torch_grad = time_torch(lhs, rhs, strides, padding, _REPEATS.value)
        for name, ms in [("jax_fwd", jax_fwd), ("torch_fwd", torch_fwd)]:
            totals[name] += count * ms
        for name, ms in [("jax_grad", jax_grad), ("torch_grad", torch_grad)]:
            totals[name] += count * ms
        print(
            f"{str(lhs):<18} {str(rhs):<16} {strides[0]:>6} {count:>2} {jax_fwd:>8.2f} "
            f"{torch_fwd:>9.2f} {jax_grad:>8.2f} {torch_grad:>9.2f} {torch_grad / jax_grad:>9.2f}"
        )
        rows.append(
            {
                "input": lhs,
                "kernel": rhs,
                "count": count,
                "jax_ms": jax_grad,
                "torch_ms": torch_grad,
            }
        )
    print(
        f"all convolutions of one step (ms): forward jax {totals['jax_fwd']:.0f} / torch "
        f"{totals['torch_fwd']:.0f}; forward+backward jax {totals['jax_grad']:.0f} / torch "
        f"{totals['torch_grad']:.0f} (torch/jax {totals['torch_grad'] / totals['jax_grad']:.2f})"
    )
    print(json.dumps({"batch": _BATCH.value, "totals_ms": dict(totals), "convolutions": rows}))


if __name__ == "__main__":
    app.run(main)
