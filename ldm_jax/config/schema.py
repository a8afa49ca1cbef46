"""The configuration schema: every key with its default, the values a choice allows, what
follows from the keys (latent shape, classes, mesh sizes), and the JSON a workdir keeps.

Every run is described by one ``ml_collections.ConfigDict``. ``base_config()`` holds every key
with its default, the one place each default is written; ``configs/NAME.py`` changes what it
needs. ``checks.validate`` runs once at start-up and names the bad key and the allowed values,
so a mistake never surfaces inside jax.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from ldm_jax import storage
from ldm_jax.data.shapes import NUM_CLASSES
from ldm_jax.parallel import mesh as mesh_lib

# The values of the config's choices that no lower layer defines (the samplers, schedules,
# remat policies, ... are the diffusion and model layers' own).
STAGES = ("both", "autoencoder", "diffusion", "finetune")
FINETUNE_METHODS = ("lora", "full")
SOURCES = ("shapes", "image_folder", "tfds")
CONDITIONINGS = ("text", "class", "none")
TEXT_ENCODER_KINDS = ("scratch", "clip")
DTYPES = ("float32", "bfloat16")
AUTOENCODER_KINDS = ("kl", "vq")
PIXEL_LOSSES = ("l1", "l2")
DISCRIMINATOR_LOSSES = ("hinge", "vanilla")
# A step with a non-finite loss or gradient: stop the run, or skip the update and count it.
NONFINITE_POLICIES = ("halt", "skip")
MESH_KEYS = ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp", "dcn_tensor")
WORKDIR_CONFIG_FILE = "config.json"


def _optimizer(steps: int, batch_size: int, learning_rate: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            warmup_steps=100,
            end_learning_rate_fraction=0.1,
            weight_decay=0.01,
            b1=0.9,
            b2=0.999,
            grad_clip=1.0,
            ema_decay=0.999,
            # Microbatches per step: gradients of batch_size / grad_accum_steps examples are
            # summed in one jitted step (a lax.scan), so activations scale with the microbatch.
            grad_accum_steps=1,
            # The microbatches as independent branches of the step instead of a scan: no
            # memory saved, but XLA's CPU runtime runs them at once, which speeds a CPU step.
            parallel_microbatches=False,
        )
    )


def base_config() -> ml_collections.ConfigDict:
    """Every key of the schema with its default value."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.stage = "both"
    config.dtype = "float32"  # compute dtype; params stay float32

    # Sizes inside one slice (-1 fills it); dcn_* multiply them across the slices of a
    # multislice job (data parallel over the slices by default).
    config.mesh = ml_collections.ConfigDict(
        dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
    )
    config.mesh.axis_rules = mesh_lib.DEFAULT_AXIS_RULES

    config.data = ml_collections.ConfigDict(
        dict(
            source="shapes",
            image_size=32,
            path="",
            tfds_name="",
            tfds_data_dir="",
            train_split="train",
            eval_split="validation",
            num_train_examples=50_000,
            random_crop=False,
            random_flip=False,
            worker_count=0,
            # Batches read and put on the devices ahead of the step that takes them (0: read
            # each when the step asks for it); the checkpointed data position stays exact.
            # Off by default: on CPU the host already runs steps ahead (asynchronous
            # dispatch) and no consistent gain was measured (benchmarks/checkpoint_overhead.py).
            device_prefetch=0,
            max_caption_length=12,
            num_classes=0,  # class-conditional runs on real data set this; shapes knows its own
            # A directory written by `ldm-jax cache-latents`: stage 2 reads its latents
            # instead of encoding images (stage 1 must be the autoencoder that wrote it).
            latent_cache="",
        )
    )

    config.autoencoder = ml_collections.ConfigDict(
        dict(
            # "kl": a Gaussian posterior with a KL penalty; "vq": a vector-quantised latent.
            kind="kl",
            model=dict(
                block_out_channels=(64, 128, 128),
                layers_per_block=1,
                latent_channels=4,
                norm_num_groups=32,
                mid_block_attention=True,
                # One flag per level: self-attention after every resnet of that level (the
                # CompVis attn_resolutions); empty: none.
                attention_levels=(),
                # VQ only: codebook size, commitment weight beta, EMA codebook updates, and
                # the EMA usage under which a code is restarted from an encoder output.
                num_embeddings=512,
                commitment_beta=0.25,
                codebook_ema=False,
                codebook_ema_decay=0.99,
                dead_code_threshold=0.0,
            ),
            train=_optimizer(steps=2000, batch_size=32, learning_rate=1e-3).to_dict(),
            kl_weight=1e-6,
            loss=dict(
                pixel="l1",
                # LPIPS (VGG16) weights: one safetensors file made by
                # `python -m ldm_jax.interop.lpips_weights`; empty: no perceptual term.
                lpips_weights="",
                perceptual_weight=1.0,
                # Divide the reconstruction loss by a learned variance exp(logvar).
                learn_logvar=True,
                codebook_weight=1.0,
                # Patch-GAN: off when disc_weight is 0; on from step disc_start.
                disc_weight=0.0,
                disc_start=0,
                disc_loss="hinge",
                disc_num_layers=3,
                disc_channels=64,
                disc_norm="batch",
                # The discriminator's Adam: learning rate (0: the autoencoder's) and betas.
                disc_learning_rate=0.0,
                disc_b1=0.5,
                disc_b2=0.9,
            ),
            # The workdir where stage 2 finds the trained autoencoder; empty: this run's.
            workdir="",
            # A diffusers AutoencoderKL directory (config.json + safetensors) to use instead of
            # training stage 1; relative paths are inside the workdir (`ldm-jax import`).
            pretrained="",
            latent_scale_batches=8,
        )
    )

    config.diffusion = ml_collections.ConfigDict(
        dict(
            conditioning="text",
            cond_drop_prob=0.1,
            # Images concatenated to the U-Net input: "", "inpaint", "sr" (diffusion/concat.py).
            concat_conditioning="",
            super_resolution_factor=4,
            # Encode the training set once at the start of stage 2 and keep the posterior
            # means and stds in host memory (8 bytes per latent value per image), instead of
            # running the encoder at every step. For datasets that fit in memory.
            encode_once=False,
            schedule="scaled_linear",
            num_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type="epsilon",
            min_snr_gamma=0.0,
            unet=dict(
                block_out_channels=(64, 128),
                layers_per_block=2,
                attention_levels=(True, True),
                mid_block_attention=True,
                num_attention_heads=4,
                transformer_depth=1,
                # One transformer depth per level (SDXL: 0/1, 2, 10) when set; the mid block
                # takes the last. Empty: transformer_depth at every level.
                transformer_depth_per_level=(),
                norm_num_groups=32,
                dropout=0.0,
                # Activation memory: "none", "full" or "save_dots" (models/unet.py's
                # REMAT_POLICIES) rematerialisation of the resnets and spatial transformers.
                remat="none",
                # Heads per level from a fixed head width (64 in Stable Diffusion 2) when
                # positive; else num_attention_heads at every level.
                attention_head_dim=0,
                # "transformer": spatial transformers (self- and cross-attention); "plain":
                # group-normed self-attention, no context (CompVis' unconditional LDMs).
                attention_type="transformer",
                # Class conditioning: 0 adds the label's embedding to the timestep embedding;
                # a width makes the label the one cross-attention token of that width
                # (CompVis' ClassEmbedder, the class-conditional ImageNet LDM).
                class_context_dim=0,
                use_linear_projection=False,
                flip_sin_to_cos=True,
                freq_shift=0,
                # A diffusers UNet2DConditionModel directory whose weights start stage 2 when
                # the workdir has no stage-2 checkpoint (fine-tuning); relative: in the workdir.
                pretrained="",
            ),
            # kind "scratch": a small transformer trained with the U-Net (width, num_layers,
            # num_heads); kind "clip": a frozen pretrained CLIP text model read from the
            # transformers directory `pretrained` (its width must be `width`), tokenizer files
            # from `tokenizer` (default: the same directory).
            text_encoder=dict(
                kind="scratch",
                width=128,
                num_layers=2,
                num_heads=4,
                pretrained="",
                tokenizer="",
                skip_last_layers=0,
            ),
            train=_optimizer(steps=5000, batch_size=64, learning_rate=5e-4).to_dict(),
        )
    )

    # Fine-tuning a trained or imported model (config.stage = "finetune"; configs/finetune.py):
    # LoRA adapters or every U-Net weight, on config.data, as DreamBooth with an
    # instance prompt (and prior preservation with a class prompt).
    config.finetune = ml_collections.ConfigDict(
        dict(
            # The workdir of the model to fine-tune (`ldm-jax train` or `ldm-jax import`).
            base="",
            # "lora": low-rank adapters, the base frozen; "full": every U-Net weight.
            method="lora",
            # Rank, alpha (the adapters' scale is alpha / rank), the modules adapted (named
            # sets of models/lora.py's TARGET_SETS, or regular expressions searched in the
            # module path) and kohya's rank dropout (per step).
            lora=dict(rank=4, alpha=4.0, targets=("attention",), rank_dropout=0.0),
            # The frozen base's params in "bfloat16" (half the memory; the adapted kernels are
            # computed in float32) or "float32". LoRA only: full fine-tuning trains the base.
            base_dtype="float32",
            # Train the text encoder too: adapters on its attention with method "lora", its
            # weights with "full" (a from-scratch encoder, or the CLIP text model).
            train_text_encoder=False,
            # DreamBooth: every training image is captioned with this prompt (it names the
            # subject or style by an identifier, "a sks circle"); empty: the data's captions.
            instance_prompt="",
            # Prior preservation: the base model first draws num_class_images images of
            # this prompt ("a circle", into the workdir's class_images/), trained beside the
            # instance images with the loss weight prior_loss_weight; empty: off.
            class_prompt="",
            num_class_images=100,
            prior_loss_weight=1.0,
            train=_optimizer(steps=500, batch_size=8, learning_rate=1e-4).to_dict(),
        )
    )

    config.sample = ml_collections.ConfigDict(
        dict(
            sampler="ddim",
            num_steps=50,
            guidance_scale=4.0,
            # Lin et al. 2023's phi: rescale the guided output's std to the conditional one's.
            guidance_rescale=0.0,
            eta=0.0,
            timestep_spacing="leading",
            # Timesteps visited are shifted by this (Stable Diffusion: 1).
            steps_offset=1,
            # DDIM's last step goes to alpha_bar = 1 (True) or to alpha_bar_0 (False, as
            # Stable Diffusion's scheduler config).
            set_alpha_to_one=True,
            # Images of each prompt or label that `ldm-jax sample` and `evaluate` draw.
            num_per_prompt=8,
        )
    )

    config.train = ml_collections.ConfigDict(
        dict(
            log_every=50,
            checkpoint_every=500,
            max_to_keep=3,
            sample_every=1000,
            async_checkpointing=True,
            # A step with a non-finite loss or gradient: "halt" the run (naming the step and
            # the last good checkpoint) or "skip" its update and count it; at most
            # max_nonfinite_skips skipped steps before halting anyway.
            nonfinite="halt",
            max_nonfinite_skips=100,
            # Free space the workdir must have before training starts, in GiB, on top of
            # what max_to_keep checkpoints of the state need.
            min_free_gib=1.0,
        )
    )
    return config


def autoencoder_factor(config: ml_collections.ConfigDict) -> int:
    """Spatial downsampling factor f of the autoencoder."""
    return 2 ** (len(config.autoencoder.model.block_out_channels) - 1)


def mesh_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
    """The ``config.mesh`` sizes, as ``mesh.create_mesh`` and ``mesh.mesh_shape`` take them."""
    return {key: config.mesh[key] for key in MESH_KEYS}


def latent_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    size = config.data.image_size // autoencoder_factor(config)
    return size, size, config.autoencoder.model.latent_channels


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def _tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of ``to_json``; lists come back as tuples, as the config files write them."""
    merged = base_config()
    merged.update(_tuples(json.loads(text)))
    return merged


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained (or imported) with."""
    path = storage.join(workdir, WORKDIR_CONFIG_FILE)
    if not storage.as_path(path).exists():
        raise FileNotFoundError(
            f"{path} not found: --workdir must be a directory written by "
            "`ldm-jax train` (or `ldm-jax import`)"
        )
    return from_json(storage.as_path(path).read_text(encoding="utf-8"))


def num_classes(config: ml_collections.ConfigDict) -> int:
    """Number of class labels: `config.data.num_classes` when set (an imported model's),
    else the dataset's (the shapes dataset knows its own)."""
    if config.data.num_classes > 0 or config.data.source != "shapes":
        return config.data.num_classes
    return NUM_CLASSES
