"""Images/s of one U-Net training step, ours against diffusers' PyTorch, in one run.

  python benchmarks/train_step.py [--steps=10] [--batch=32] [--rounds=3] [--microbatches=2]
                                  [--torch_compile]

The step: noise float32 latents (B, 16, 16, 4) at uniform random timesteps, predict the
noise with the benchmark U-Net (`common.BENCHMARK_UNET`, 8.75M params) attending to a fixed
random text context (B, 77, 128), take the mean squared error and one AdamW update. Ours is
`ldm_jax.models.UNet` with the PyTorch module's weights (asserted to compute the same
function before anything is timed), jitted once with its state donated; theirs is diffusers'
`UNet2DConditionModel` in eager PyTorch (and, with --torch_compile, through `torch.compile`).
Ours runs twice: with XLA's convolutions (the default) and with the 3x3 convolutions through
oneDNN (`LDM_JAX_CPU_CONV=onednn`, ldm_jax/models/cpu_conv.py).

The timed steps alternate between the frameworks in rounds, so a change in the machine's load
weighs on all alike; a rate is that of the median round. GFLOP per step is XLA's cost analysis
of our step (the same function for every row); "of peak" is the achieved rate over this
machine's measured float32 matmul rate. Timing excludes compilation; it is a measurement,
never a test. Prints a table and one JSON line.
"""

from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import optax
import torch
from absl import app, flags
from common import (
    benchmark_inputs,
    benchmark_unets,
    check_same_function,
    compile_step,
    matmul_peak_gflops,
    median_rate,
    run_steps,
)
from diffusers import DDPMScheduler

from ldm_jax import diffusion
from ldm_jax.models import cpu_conv
from ldm_jax.train import accumulate

_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per framework and round.")
_BATCH = flags.DEFINE_integer("batch", 32, "Latents per step.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds the timed steps alternate in.")
_TORCH_COMPILE = flags.DEFINE_bool(
    "torch_compile", False, "Also time the PyTorch step through torch.compile (slow to compile)."
)
_MICROBATCHES = flags.DEFINE_integer(
    "microbatches",
    1,
    "Our step as with config.diffusion.train.grad_accum_steps=K and parallel_microbatches=True: "
    "the gradients of K slices of the batch, independent branches of one graph, averaged (the "
    "same update), so that XLA's CPU threads have branches to run at once.",
)
_WARMUP_STEPS = 2
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 1e-2


def train_step(state, batch, key, *, unet, optimizer, schedule, microbatches=1):
    """One ε-prediction MSE step of the U-Net and an AdamW update; noise drawn from ``key``.

    The gradient comes from `accumulate.accumulated_gradients`, as in ldm_jax's train step,
    over ``microbatches`` parallel microbatches (one: the plain gradient of the batch)."""
    latents = batch["latents"]
    time_key, noise_key = jax.random.split(jax.random.fold_in(key, state["step"]))
    t = jax.random.randint(time_key, latents.shape[:1], 0, schedule.num_timesteps)
    noise = jax.random.normal(noise_key, latents.shape, latents.dtype)
    z_t = diffusion.q_sample(schedule, latents, t, noise)

    def loss_fn(params, inputs, _):
        z_t, t, context, latents, noise = inputs
        prediction = unet.apply({"params": params}, z_t, t, context)
        loss = diffusion.diffusion_loss(schedule, "epsilon", prediction, latents, noise, t)[0]
        return loss, {"loss": loss}

    inputs = (z_t, t, batch["context"], latents, noise)
    grads, metrics = accumulate.accumulated_gradients(
        loss_fn, state["params"], inputs, key, microbatches, parallel=True
    )
    loss = metrics["loss"]
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, loss


def jax_step(unet, params, inputs: dict, microbatches: int = 1) -> tuple:
    """(our step function, its AdamW state from ``params``, its other arguments) on
    ``inputs``' latents and context: what is timed, compiled with the state donated."""
    schedule = diffusion.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    optimizer = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    step0 = jnp.zeros((), jnp.int32)
    state = {"step": step0, "params": params, "opt_state": optimizer.init(params)}
    batch = {"latents": jnp.asarray(inputs["latents"]), "context": jnp.asarray(inputs["context"])}
    step = functools.partial(
        train_step, unet=unet, optimizer=optimizer, schedule=schedule, microbatches=microbatches
    )
    return step, state, (batch, jax.random.key(1))


def torch_train_step(model, optimizer, scheduler, latents, context):
    """The same step in PyTorch (NCHW latents), as a diffusers training script takes it."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
    noise = torch.randn_like(latents)
    prediction = model(
        scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=context
    ).sample
    loss = torch.nn.functional.mse_loss(prediction, noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def _torch_runner(step, steps: int):
    def run() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        loss.item()
        return time.perf_counter() - start

    return run


def _jax_runner(compiled, state, args):
    state, _ = run_steps(compiled, state, args, _WARMUP_STEPS)

    def run() -> float:
        nonlocal state
        state, seconds = run_steps(compiled, state, args, _STEPS.value)
        return seconds

    return run


def main(_):
    batch_size = _BATCH.value
    reference, unet, params = benchmark_unets()
    inputs = benchmark_inputs(batch_size)
    diff = check_same_function(reference, unet, params, inputs)

    if batch_size % _MICROBATCHES.value:
        raise ValueError(f"--microbatches={_MICROBATCHES.value} must divide --batch={batch_size}")
    step, state, args = jax_step(unet, params, inputs, _MICROBATCHES.value)
    runners = {}
    with cpu_conv.onednn_allowed(False):  # new function objects: each traced anew
        compiled, gflop = compile_step(functools.partial(step), state, args)
    runners["ldm_jax (jit)"] = _jax_runner(compiled, jax.tree.map(jnp.copy, state), args)
    with cpu_conv.onednn_allowed(True):  # the same function: the plain program's FLOPs
        compiled, _ = compile_step(functools.partial(step), state, args, count_flops=False)
    runners["ldm_jax (oneDNN)"] = _jax_runner(compiled, jax.tree.map(jnp.copy, state), args)

    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    latents = torch.from_numpy(inputs["latents"]).permute(0, 3, 1, 2).contiguous()
    context = torch.from_numpy(inputs["context"])
    models = {"pytorch eager": reference.train()}
    if _TORCH_COMPILE.value:
        models["pytorch compile"] = torch.compile(reference)
    for name, model in models.items():
        torch_optimizer = torch.optim.AdamW(
            reference.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY
        )
        torch_step = functools.partial(
            torch_train_step, model, torch_optimizer, scheduler, latents, context
        )
        start = time.perf_counter()
        try:
            _torch_runner(torch_step, _WARMUP_STEPS)()
        except Exception as error:  # torch.compile needs a working C++ toolchain
            print(f"{name}: skipped ({type(error).__name__}: {str(error)[:200]})")
            continue
        print(f"{name}: warm-up (compilation) took {time.perf_counter() - start:.1f} s")
        runners[name] = _torch_runner(torch_step, _STEPS.value)

    seconds = {name: [] for name in runners}
    for _ in range(_ROUNDS.value):
        for name, run in runners.items():
            seconds[name].append(run())

    peak = matmul_peak_gflops()
    print(
        f"devices: {jax.device_count()} x {jax.devices()[0].platform}; torch threads "
        f"{torch.get_num_threads()}; float32 matmul peak {peak:.0f} GFLOP/s; batch {batch_size} "
        f"(ours in {_MICROBATCHES.value} parallel microbatches); "
        f"forward outputs agree within {diff:.1e}"
    )
    print(
        f"{'framework':<16} {'images/s':>9} {'vs eager':>8} {'GFLOP/step':>10} {'GFLOP/s':>8} "
        f"{'of peak':>7}"
    )
    eager = median_rate(seconds["pytorch eager"], batch_size * _STEPS.value)
    record = {
        "batch": batch_size,
        "microbatches": _MICROBATCHES.value,
        "gflop_per_step": round(gflop, 2),
        "matmul_peak": round(peak),
    }
    for name, times in seconds.items():
        images_per_second = median_rate(times, batch_size * _STEPS.value)
        achieved = gflop * images_per_second / batch_size
        print(
            f"{name:<16} {images_per_second:>9.1f} {images_per_second / eager:>8.2f} "
            f"{gflop:>10.1f} {achieved:>8.1f} {achieved / peak:>7.1%}"
        )
        record[name] = {
            "images_per_second": round(images_per_second, 2),
            "ratio_to_eager": round(images_per_second / eager, 3),
            "fraction_of_peak": round(achieved / peak, 4),
        }
    print(json.dumps(record))


if __name__ == "__main__":
    app.run(main)
