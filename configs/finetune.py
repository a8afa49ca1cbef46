"""Fine-tune a trained or imported model: ``--config=configs/finetune.py:VARIANT,BASE_WORKDIR``.

  ldm-jax train --config=configs/finetune.py:lora,runs/sd15 --workdir=runs/my_lora \
      --config.data.source=image_folder --config.data.path=/data/my_images

The config is the base workdir's own (its model, autoencoder, text encoder and sampling
settings), with ``config.stage = "finetune"`` and ``config.finetune.base`` naming it. Variants:

- ``lora``: rank-4 adapters on the U-Net's attention projections, on the data's captions.
- ``dreambooth``: every U-Net weight, every image captioned with ``finetune.instance_prompt``
  (set it: ``--config.finetune.instance_prompt="a photo of sks dog"``), prior preservation
  with ``finetune.class_prompt`` when that is set.
- ``dreambooth_lora``: DreamBooth with LoRA adapters instead of every weight.

Every key can be overridden: ``--config.finetune.lora.rank=16``,
``--config.finetune.train_text_encoder=True``, ``--config.finetune.train.steps=800``.
"""

from ldm_jax.config.schema import load_workdir_config

VARIANTS = ("lora", "dreambooth", "dreambooth_lora")


def get_config(arg: str | None = None):
    variant, _, base = (arg or "").partition(",")
    if variant not in VARIANTS or not base:
        raise ValueError(
            f"configs/finetune.py needs VARIANT,BASE_WORKDIR (got {arg!r}): VARIANT one of "
            f"{', '.join(VARIANTS)}, e.g. --config=configs/finetune.py:lora,runs/quickstart"
        )
    try:
        config = load_workdir_config(base)
    except FileNotFoundError:
        raise ValueError(
            f"configs/finetune.py:{arg}: {base} is not a workdir (it holds no config.json): "
            "BASE_WORKDIR must be written by `ldm-jax train` or `ldm-jax import`"
        ) from None
    config.stage = "finetune"
    ft = config.finetune
    ft.base = base
    ft.method = "full" if variant == "dreambooth" else "lora"
    ft.train.ema_decay = 0.0  # the trained weights themselves are sampled
    ft.train.warmup_steps = 0
    ft.train.end_learning_rate_fraction = 1.0  # a constant learning rate
    ft.train.weight_decay = 0.0 if ft.method == "lora" else 1e-2
    # diffusers' train_dreambooth(_lora).py defaults: 5e-6 for every weight, 1e-4 for LoRA.
    ft.train.learning_rate = 5e-6 if ft.method == "full" else 1e-4
    if variant.startswith("dreambooth"):
        ft.train.batch_size = 4
        ft.train.steps = 400
    return config
