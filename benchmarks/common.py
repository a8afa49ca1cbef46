"""What the benchmark scripts share: this machine's matmul peak, timing a jitted step, and the
benchmark U-Net built twice, as diffusers' PyTorch module and as ours with the same weights.

The scripts are run as ``python benchmarks/NAME.py`` from the repository root, so this
directory is first on ``sys.path`` and they import this file as ``common``.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import host_memory
from ldm_jax.models import cpu_conv
from ldm_jax.parallel import platforms

# Every benchmark runs, as `ldm-jax` does, with glibc's malloc asking for transparent huge
# pages (see ldm_jax/host_memory.py); PyTorch, in the same process, gets them too.
# LDM_JAX_HUGE_PAGES=0 measures without.
host_memory.use_huge_pages()
# ... and without libtpu probing for a TPU that is not there (ldm_jax/parallel/platforms.py).
platforms.skip_absent_tpu()

# The benchmark U-Net: diffusers' `UNet2DConditionModel` with these arguments (8.75M params)
# on 16x16x4 latents, attending to a text context of `CONTEXT_LENGTH` tokens. In diffusers'
# `UNet2DConditionModel`, `attention_head_dim` is the number of heads.
BENCHMARK_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 128, 128),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=128,
    attention_head_dim=8,
    norm_num_groups=32,
)
LATENT_SIZE, LATENT_CHANNELS, CONTEXT_LENGTH = 16, 4, 77
# Largest allowed difference between the two models' outputs on the same inputs.
FORWARD_TOLERANCE = 1e-4


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best observed float32 matmul rate of this machine, in GFLOP/s."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def compile_step(step_fn, state, args, count_flops: bool = True) -> tuple[Any, float]:
    """(the compiled ``step_fn(state, *args)`` with the state donated, its GFLOP per call from
    XLA's cost analysis).

    The FLOPs are those of the same step compiled as plain XLA: the cost analysis does not see
    into the oneDNN convolutions (``ldm_jax/models/cpu_conv.py``) of the program that runs, so
    a program holding them is compiled once more without. ``count_flops=False``: 0.0, no
    second compile.
    """
    lowered = jax.jit(step_fn, donate_argnums=0).lower(state, *args)
    compiled = lowered.compile()
    if not count_flops:
        return compiled, 0.0
    if "__onednn$convolution" in lowered.as_text():  # count on the plain XLA program
        with cpu_conv.onednn_allowed(False):  # a new function object: traced anew
            plain = jax.jit(functools.partial(step_fn), donate_argnums=0).lower(state, *args)
            return compiled, plain.compile().cost_analysis().get("flops", 0.0) / 1e9
    return compiled, compiled.cost_analysis().get("flops", 0.0) / 1e9


def run_steps(compiled, state, args, steps: int) -> tuple[Any, float]:
    """(the state after ``steps`` calls of ``compiled(state, *args) -> (state, metrics)``, the
    seconds they took until their last metrics were ready)."""
    start = time.perf_counter()
    metrics = None
    for _ in range(steps):
        state, metrics = compiled(state, *args)
    jax.block_until_ready(metrics)
    return state, time.perf_counter() - start


def time_step(step_fn, state, args, steps: int) -> tuple[float, float]:
    """(GFLOP per step, seconds per step) of a jitted ``step_fn(state, *args)``."""
    compiled, gflop = compile_step(step_fn, state, args)
    state, _ = run_steps(compiled, state, args, 2)
    _, seconds = run_steps(compiled, state, args, steps)
    return gflop, seconds / steps


def benchmark_unets(seed: int = 0) -> tuple[Any, Any, dict]:
    """(diffusers' PyTorch U-Net, our `UNet`, our params) of `BENCHMARK_UNET`, same weights.

    The PyTorch module's weights are its default initialisation under ``seed``; ours are
    read from its state dict, as ``ldm-jax import --from=diffusers`` reads a directory.
    """
    import torch
    from diffusers import UNet2DConditionModel

    from ldm_jax.interop.diffusers import unet_from_diffusers_config, unet_params_from_state_dict

    torch.manual_seed(seed)
    reference = UNet2DConditionModel(**BENCHMARK_UNET)
    unet = unet_from_diffusers_config(dict(reference.config))
    state_dict = {name: value.numpy() for name, value in reference.state_dict().items()}
    params = jax.tree.map(jnp.asarray, unet_params_from_state_dict(unet, state_dict))
    return reference, unet, params


def benchmark_inputs(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Latents (B, 16, 16, 4), timesteps (B,) and a text context (B, 77, 128), float32."""
    rng = np.random.default_rng(seed)
    shape = (batch, LATENT_SIZE, LATENT_SIZE, LATENT_CHANNELS)
    context_dim = BENCHMARK_UNET["cross_attention_dim"]
    return {
        "latents": rng.standard_normal(shape, dtype=np.float32),
        "timesteps": rng.integers(0, 1000, (batch,)).astype(np.int32),
        "context": rng.standard_normal((batch, CONTEXT_LENGTH, context_dim), dtype=np.float32),
    }


def check_same_function(reference, unet, params, inputs: dict[str, np.ndarray]) -> float:
    """Max abs difference of the two U-Nets' outputs on ``inputs``; raises if above tolerance."""
    import torch

    ours = jax.jit(unet.apply)(
        {"params": params}, inputs["latents"], inputs["timesteps"], inputs["context"]
    )
    with torch.inference_mode():
        theirs = reference(
            torch.from_numpy(inputs["latents"]).permute(0, 3, 1, 2),
            torch.from_numpy(inputs["timesteps"]).long(),
            encoder_hidden_states=torch.from_numpy(inputs["context"]),
        ).sample.permute(0, 2, 3, 1)
    diff = float(np.max(np.abs(np.asarray(ours) - theirs.numpy())))
    if diff > FORWARD_TOLERANCE:
        raise AssertionError(f"the two U-Nets differ by {diff:.2e} > {FORWARD_TOLERANCE:.0e}")
    return diff


def median_rate(seconds: list[float], items: int) -> float:
    """Items per second of the median of several timed rounds of ``items`` each."""
    return items / float(np.median(seconds))
