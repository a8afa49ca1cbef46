"""4x super-resolution on the shapes dataset: 8x8 bicubic-downsampled inputs to 32x32.

The U-Net sees the low-resolution image concatenated to its 8x8x4 latents (the kl-f4
autoencoder's latents are the size of the 8x8 input: 4 + 3 input channels, the layout of
the LDM and Stable Diffusion x4 upscalers). No text: the image is the condition. The
autoencoder is the quickstart's; to reuse a trained one, add
``--config.stage=diffusion --config.autoencoder.workdir=QUICKSTART_WORKDIR``.

  ldm-jax train --config=configs/superres.py --workdir=/tmp/superres
  ldm-jax sample --workdir=/tmp/superres --mode=sr --init_image=low_res_8x8.png

Variant: ``:tiny`` for tests.
"""

import importlib.util
import pathlib


def get_config(arg: str | None = None):
    path = pathlib.Path(__file__).with_name("quickstart.py")
    spec = importlib.util.spec_from_file_location("quickstart", path)
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown variant {arg!r} for configs/superres.py; allowed: ['tiny']")
    config = quickstart.get_config(arg)
    dm = config.diffusion
    dm.conditioning = "none"
    dm.concat_conditioning = "sr"
    dm.super_resolution_factor = 4
    dm.encode_once = False  # the low-resolution inputs come with the images
    # v-prediction: 26.8 dB PSNR on held-out images against 24.0 dB predicting epsilon (and
    # bicubic's 26.3 dB; `python benchmarks/applications.py sr`).
    dm.prediction_type = "v"
    # Upsampling is local: convolutions only, no attention.
    dm.unet.attention_levels = (False, False)
    dm.unet.mid_block_attention = False
    if arg != "tiny":
        dm.unet.block_out_channels = (32, 64)
        dm.train.steps = 1000
        dm.train.batch_size = 32
        dm.train.learning_rate = 1e-3
    # Deterministic DDIM: the sample closest to the mean, which is what PSNR rewards.
    config.sample.sampler = "ddim"
    config.sample.num_steps = 4 if arg == "tiny" else 25
    config.sample.guidance_scale = 1.0
    return config
