"""Images/s of 50-step DDIM sampling with classifier-free guidance, ours against diffusers'.

  python benchmarks/sampling.py [--batch=16] [--steps=50] [--rounds=3]

Both sample float32 latents (B, 16, 16, 4) with the benchmark U-Net (`common.BENCHMARK_UNET`)
under the default sampling options of `ldm-jax sample` (the base config's `sample` block:
DDIM, η = 0, "leading" timesteps, steps offset 1, ᾱ = 1 after the last step, guidance 4): a
batch of 2B through the U-Net per step, B conditioned on a fixed random text context and B on
a null context. Ours is what `pipeline.generator.generate` runs between the noise and the
decoder (`LatentDiffusion.denoiser` and
`diffusion.sample`, one jitted `lax.scan`); theirs is diffusers' pipeline loop, its
`UNet2DConditionModel` and `DDIMScheduler` (the same schedule) under `torch.inference_mode`.
Both start from the same noise; their final latents are asserted close before timing.

The timed runs alternate between the frameworks in rounds; a rate is that of the median
round. Timing excludes compilation; it is a measurement, never a test. Prints a table and one
JSON line.
"""

from __future__ import annotations

import json
import time

import flax.linen as nn
import jax
import numpy as np
import torch
from absl import app, flags
from common import BENCHMARK_UNET, benchmark_inputs, benchmark_unets, median_rate
from diffusers import DDIMScheduler

from ldm_jax import diffusion
from ldm_jax.config import base_config
from ldm_jax.pipeline.generator import sampling_options
from ldm_jax.pipeline.model import LatentDiffusion

_BATCH = flags.DEFINE_integer("batch", 16, "Images per sampling run (2x through the U-Net).")
_STEPS = flags.DEFINE_integer("steps", 50, "DDIM steps.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds the timed runs alternate in.")
# The final latents of the two frameworks may differ by this much (50 steps of float32).
LATENT_TOLERANCE = 2e-3


class PrecomputedContext(nn.Module):
    """A text encoder whose input is already the context: the benchmark's conditions."""

    @nn.compact
    def __call__(self, context: jax.Array) -> jax.Array:
        return context


def torch_sample(model, scheduler, noise, context, guidance_scale: float, steps: int):
    """diffusers' pipeline loop: guided ε from one doubled batch, then a DDIM step."""
    scheduler.set_timesteps(steps)
    latents = noise
    with torch.inference_mode():
        for t in scheduler.timesteps:
            eps = model(torch.cat([latents, latents]), t, encoder_hidden_states=context).sample
            cond, uncond = eps.chunk(2)
            guided = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(guided, t, latents, eta=0.0).prev_sample
    return latents


def main(_):
    batch_size, steps = _BATCH.value, _STEPS.value
    options = sampling_options(base_config().sample, num_steps=steps)
    reference, unet, params = benchmark_unets()
    inputs = benchmark_inputs(2 * batch_size)
    noise = inputs["latents"][:batch_size]
    context = inputs["context"][:batch_size]
    null_context = inputs["context"][batch_size]

    schedule = diffusion.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    model = LatentDiffusion(
        unet=unet,
        autoencoder=None,
        text_encoder=PrecomputedContext(),
        schedule=schedule,
        conditioning="text",
        null_condition=null_context,
        latent_shape=noise.shape[1:],
        latent_scale=1.0,
    )

    @jax.jit
    def generate(params, z_T, condition, key):
        denoise = model.denoiser(
            {"unet": params, "text_encoder": {}}, condition, options.guidance_scale
        )
        return diffusion.sample(
            denoise,
            schedule,
            z_T,
            key,
            sampler=options.sampler,
            num_steps=options.num_steps,
            eta=options.eta,
            timestep_spacing=options.timestep_spacing,
            steps_offset=options.steps_offset,
            set_alpha_to_one=options.set_alpha_to_one,
        )

    args = (params, jax.numpy.asarray(noise), jax.numpy.asarray(context), jax.random.key(0))
    compiled = generate.lower(*args).compile()
    ours = np.asarray(compiled(*args))

    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=options.set_alpha_to_one,
        steps_offset=options.steps_offset,
        timestep_spacing=options.timestep_spacing,
    )
    torch_noise = torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous()
    torch_context = torch.from_numpy(
        np.concatenate([context, np.broadcast_to(null_context, context.shape)])
    )
    reference.eval()

    def run_torch():
        return torch_sample(
            reference, scheduler, torch_noise, torch_context, options.guidance_scale, steps
        )

    theirs = run_torch().permute(0, 2, 3, 1).numpy()
    diff = float(np.max(np.abs(ours - theirs)))
    if diff > LATENT_TOLERANCE:
        raise AssertionError(f"final latents differ by {diff:.2e} > {LATENT_TOLERANCE:.0e}")

    runners = {
        "ldm_jax (jit)": lambda: compiled(*args).block_until_ready(),
        "pytorch eager": run_torch,
    }
    seconds = {name: [] for name in runners}
    for _ in range(_ROUNDS.value):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)

    print(
        f"devices: {jax.device_count()} x {jax.devices()[0].platform}; torch threads "
        f"{torch.get_num_threads()}; DDIM {steps} steps, guidance {options.guidance_scale}, "
        f"batch {batch_size} ({2 * batch_size} through the U-Net of "
        f"{BENCHMARK_UNET['block_out_channels']}); final latents agree within {diff:.1e}"
    )
    print(f"{'framework':<16} {'images/s':>9} {'vs eager':>8} {'s/run':>7}")
    eager = median_rate(seconds["pytorch eager"], batch_size)
    record = {"batch": batch_size, "steps": steps, "latent_max_abs_diff": diff}
    for name, times in seconds.items():
        images_per_second = median_rate(times, batch_size)
        print(
            f"{name:<16} {images_per_second:>9.2f} {images_per_second / eager:>8.2f} "
            f"{float(np.median(times)):>7.2f}"
        )
        record[name] = {
            "images_per_second": round(images_per_second, 3),
            "ratio_to_eager": round(images_per_second / eager, 3),
        }
    print(json.dumps(record))


if __name__ == "__main__":
    app.run(main)
