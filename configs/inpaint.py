"""Inpainting by concatenated conditioning: the quickstart text-to-image model whose U-Net
also sees the masked image's latents and the mask (latent_channels * 2 + 1 input channels),
trained on random boxes and strokes with a quarter of the images fully masked.

  ldm-jax train --config=configs/inpaint.py --workdir=/tmp/inpaint
  ldm-jax sample --workdir=/tmp/inpaint --mode=inpaint --init_image=in.png --mask=mask.png \
      --prompt="a blue circle"

Any text-to-image model inpaints without this training too (the known region replaced after
every step); this model sees the known region whole instead. Variant: ``:tiny`` for tests.
"""

import importlib.util
import pathlib


def get_config(arg: str | None = None):
    path = pathlib.Path(__file__).with_name("quickstart.py")
    spec = importlib.util.spec_from_file_location("quickstart", path)
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown variant {arg!r} for configs/inpaint.py; allowed: ['tiny']")
    config = quickstart.get_config(arg)
    config.diffusion.concat_conditioning = "inpaint"
    # The masked image is encoded at every step, with a fresh mask.
    config.diffusion.encode_once = False
    return config
