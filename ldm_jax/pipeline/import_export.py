"""`ldm-jax import` and `ldm-jax export`: between workdirs and the weight formats of
``ldm_jax.interop``.

An imported workdir holds the weights as diffusers / transformers folders (`unet/`, `vae/`
or, with a VQ autoencoder, `vqvae/`, `text_encoder/`, `tokenizer/`) and a `config.json`
describing the same architecture that names them (paths relative to the workdir), so
`ldm-jax sample` draws from it at once and `ldm-jax train --config=configs/workdir.py:DIR`
fine-tunes it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from ldm_jax import config as config_lib
from ldm_jax import storage
from ldm_jax.interop import clip as clip_interop
from ldm_jax.interop import lora as lora_files
from ldm_jax.interop import single_file
from ldm_jax.interop.convert import ImportedModel
from ldm_jax.interop.formats import EXPORT_FORMATS, IMPORT_FORMATS
from ldm_jax.interop.pipeline import (
    autoencoder_folder,
    check_diffusers_pipeline,
    copy_tokenizer,
    load_diffusers_pipeline,
    save_diffusers_pipeline,
)
from ldm_jax.models import UNet, VQAutoencoder
from ldm_jax.parallel import sharding
from ldm_jax.pipeline import finetuned, load
from ldm_jax.pipeline.load import load_model
from ldm_jax.pipeline.workdir import TOKENIZER_FILE, resolve

log = logging.getLogger(__name__)

# The sampling defaults of Stable Diffusion's own pipelines.
# The weights of a model that no diffusers pipeline computes as, in original names.
SINGLE_FILE_NAME = "model.safetensors"
_SD_SAMPLING = dict(sampler="ddim", num_steps=50, guidance_scale=7.5, eta=0.0)


def _unet_config(config: ml_collections.ConfigDict, unet: Any) -> None:
    if unet.norm_eps != UNet.norm_eps:
        raise ValueError(
            f"the U-Net's GroupNorm epsilon is {unet.norm_eps}; the config describes U-Nets "
            f"with {UNet.norm_eps} only"
        )
    u = config.diffusion.unet
    u.block_out_channels = tuple(unet.block_out_channels)
    u.layers_per_block = unet.layers_per_block
    u.attention_levels = tuple(bool(a) for a in unet.attention_levels)
    u.mid_block_attention = unet.mid_block_attention
    heads = unet.heads_per_level
    head_dims = {c // h for c, h in zip(unet.block_out_channels, heads, strict=True)}
    if len(set(heads)) == 1:
        u.num_attention_heads, u.attention_head_dim = heads[0], 0
    elif len(head_dims) == 1:
        u.attention_head_dim = head_dims.pop()
    else:
        raise ValueError(
            f"the U-Net's attention heads per level {heads} are neither one count nor one "
            "head width; the config cannot describe them"
        )
    u.transformer_depth = unet.transformer_depth
    u.attention_type = unet.attention_type
    u.use_linear_projection = unet.use_linear_projection
    u.norm_num_groups = unet.norm_num_groups
    u.flip_sin_to_cos = unet.flip_sin_to_cos
    u.freq_shift = int(unet.freq_shift)
    u.dropout = unet.dropout
    u.pretrained = "unet"
    if unet.num_classes is not None:
        config.diffusion.conditioning = "class"
        config.data.num_classes = unet.num_classes
        class_context = unet.class_conditioning == "context"
        u.class_context_dim = unet.context_dim if class_context else 0
    elif unet.context_dim is None:
        config.diffusion.conditioning = "none"


def _autoencoder_config(config: ml_collections.ConfigDict, vae: Any) -> None:
    m = config.autoencoder.model
    m.block_out_channels = tuple(vae.block_out_channels)
    m.layers_per_block = vae.layers_per_block
    m.latent_channels = vae.latent_channels
    m.norm_num_groups = vae.norm_num_groups
    m.mid_block_attention = vae.mid_block_attention
    m.attention_levels = tuple(bool(a) for a in vae.attention_levels)
    if isinstance(vae, VQAutoencoder):
        config.autoencoder.kind = "vq"
        m.num_embeddings = vae.num_embeddings
    config.autoencoder.pretrained = autoencoder_folder(vae)


def _text_encoder_config(config: ml_collections.ConfigDict, text_encoder: Any) -> None:
    t = config.diffusion.text_encoder
    t.kind, t.pretrained, t.tokenizer = "clip", "text_encoder", "tokenizer"
    t.width = text_encoder.width
    config.data.max_caption_length = text_encoder.max_length
    config.diffusion.conditioning = "text"


def workdir_config(
    unet: ImportedModel,
    vae: ImportedModel,
    text_encoder: ImportedModel | None,
    schedule: dict[str, Any],
    sample_size: int,
) -> ml_collections.ConfigDict:
    """The config of an imported model: stage 2 only, every module from its folder."""
    config = config_lib.base_config()
    config.stage = "diffusion"
    _autoencoder_config(config, vae.module)
    _unet_config(config, unet.module)
    if text_encoder is not None:
        _text_encoder_config(config, text_encoder.module)
    config.data.image_size = sample_size * vae.module.downsample_factor
    for key in ("schedule", "num_timesteps", "beta_start", "beta_end", "prediction_type"):
        config.diffusion[key] = schedule[key]
    config.sample.timestep_spacing = schedule["timestep_spacing"]
    config.sample.steps_offset = schedule["steps_offset"]
    config.sample.set_alpha_to_one = schedule["set_alpha_to_one"]
    config.sample.update(_SD_SAMPLING)
    return config


def _write_workdir(
    workdir: str, config: ml_collections.ConfigDict, pipeline: dict[str, Any]
) -> None:
    """The weights as a diffusers pipeline folder (the workdir is one) plus config.json."""
    config_lib.validate(config, jax.device_count())
    if storage.as_path(workdir).joinpath(config_lib.WORKDIR_CONFIG_FILE).exists():
        raise FileExistsError(
            f"{workdir} already holds a run (config.json): import into a new --workdir"
        )
    unet, vae = pipeline["unet"], pipeline["vae"]
    try:
        check_diffusers_pipeline(unet.module, vae.module, pipeline["text_encoder"])
    except ValueError as no_pipeline:
        # No diffusers pipeline computes as this model (CompVis' class-conditional ImageNet
        # LDM): its U-Net and autoencoder are kept as one original single file instead.
        log.info("%s; keeping the weights as %s", no_pipeline, SINGLE_FILE_NAME)
        if pipeline["text_encoder"] is not None:
            raise
        single_file.save_single_file(storage.join(workdir, SINGLE_FILE_NAME), unet=unet, vae=vae)
        config.diffusion.unet.pretrained = config.autoencoder.pretrained = SINGLE_FILE_NAME
    else:
        save_diffusers_pipeline(
            workdir,
            unet=ImportedModel(unet.module, unet.params, {"sample_size": pipeline["sample_size"]}),
            vae=vae,
            schedule=pipeline["schedule"],
            text_encoder=pipeline["text_encoder"],
            tokenizer=pipeline["tokenizer"],
        )
    storage.write_text(
        storage.join(workdir, config_lib.WORKDIR_CONFIG_FILE), config_lib.to_json(config)
    )


def import_model(
    kind: str,
    path: str,
    workdir: str,
    tokenizer: str | None = None,
    prediction_type: str | None = None,
    image_size: int | None = None,
) -> str:
    """Imports `path` of format `kind` (one of IMPORT_FORMATS) into `workdir`.

    `tokenizer` (a CLIP tokenizer folder), `prediction_type` ("epsilon" by default; "v"
    for Stable Diffusion 2 768-v models) and `image_size` (pixels; see `load_single_file`)
    are for single files, which store none of them.

    Returns:
      A line for the user saying what was written and what to run next.
    """
    if kind == "clip":
        return _import_clip(path, workdir)
    if kind == "diffusers":
        pipeline = load_diffusers_pipeline(path)
    elif kind == "single-file":
        pipeline = _single_file_pipeline(path, tokenizer, prediction_type or "epsilon", image_size)
    else:
        raise ValueError(f"--from={kind!r} is not a format; choose one of {IMPORT_FORMATS}")
    config = workdir_config(
        pipeline["unet"],
        pipeline["vae"],
        pipeline["text_encoder"],
        pipeline["schedule"],
        pipeline["sample_size"],
    )
    _write_workdir(workdir, config, pipeline)
    condition = {"text": " --prompt=...", "class": " --label=N"}.get(
        config.diffusion.conditioning, ""
    )
    return (
        f"imported {path} into {workdir}; draw with `ldm-jax sample --workdir={workdir} "
        f"--num_per_prompt=4{condition}`, fine-tune with `ldm-jax train "
        f"--config=configs/workdir.py:{workdir} --workdir={workdir} "
        "--config.data.source=image_folder --config.data.path=...`"
    )


def _single_file_pipeline(
    path: str, tokenizer: str | None, prediction_type: str, image_size: int | None
) -> dict[str, Any]:
    components = single_file.load_single_file(
        path, prediction_type=prediction_type, image_size=image_size
    )
    for name in ("unet", "vae"):
        if name not in components:
            raise ValueError(f"{path} holds no {name}: a single file must have both")
    text_encoder = components.get("text_encoder")
    if text_encoder is not None and not tokenizer:
        raise ValueError(
            f"{path} has a CLIP text encoder but single files carry no tokenizer: pass "
            "--tokenizer=DIR, a folder with the CLIP vocab.json and merges.txt"
        )
    unet = components["unet"]
    return dict(
        unet=unet,
        vae=components["vae"],
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        schedule=single_file.schedule_of(components),
        sample_size=int(unet.extras.get("sample_size", 64)),
    )


def _import_clip(path: str, workdir: str) -> str:
    imported = clip_interop.load_clip_text_encoder(path)
    target = storage.join(workdir, "text_encoder")
    if storage.as_path(target).exists():
        raise FileExistsError(f"{target} exists: import the text encoder into a new --workdir")
    clip_interop.save_clip_text_encoder(
        imported.module, imported.params, target, config=imported.extras.get("config")
    )
    copy_tokenizer(path, storage.join(workdir, "tokenizer"))
    return (
        f"imported the CLIP text encoder {path} into {target}; train a U-Net on it with "
        f"--workdir={workdir} --config.diffusion.text_encoder.kind=clip "
        "--config.diffusion.text_encoder.pretrained=text_encoder "
        "--config.diffusion.text_encoder.tokenizer=tokenizer "
        f"--config.diffusion.text_encoder.width={imported.module.width} "
        f"--config.data.max_caption_length={imported.module.max_length}"
    )


def workdir_components(
    workdir: str, raw: bool = False, config: ml_collections.ConfigDict | None = None
) -> dict[str, Any]:
    """The modules and host params of a workdir's model (EMA params unless `raw`), loaded on
    the mesh of its config (or of `config`: the workdir's with overrides), then gathered."""
    loaded = load_model(workdir, config, raw=raw)
    model, config = loaded.model, loaded.config
    params = sharding.to_host(loaded.params)
    text_encoder, tokenizer = None, None
    text = config.diffusion.text_encoder
    if text.kind == "clip":  # frozen: exported as it was imported
        text_encoder = clip_interop.load_clip_text_encoder(resolve(workdir, text.pretrained))
        tokenizer = resolve(workdir, text.tokenizer or text.pretrained)
    sample_size = config.data.image_size // model.autoencoder.downsample_factor
    return dict(
        unet=ImportedModel(model.unet, params["unet"], {"sample_size": sample_size}),
        vae=ImportedModel(
            model.autoencoder, params["autoencoder"], {"scaling_factor": model.latent_scale}
        ),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        schedule=dict(
            schedule=config.diffusion.schedule,
            num_timesteps=config.diffusion.num_timesteps,
            beta_start=config.diffusion.beta_start,
            beta_end=config.diffusion.beta_end,
            prediction_type=config.diffusion.prediction_type,
            timestep_spacing=config.sample.timestep_spacing,
            steps_offset=config.sample.steps_offset,
            set_alpha_to_one=config.sample.set_alpha_to_one,
        ),
    )


def export_diffusers(
    workdir_or_components: str | Mapping[str, Any],
    out_dir: str,
    raw: bool = False,
    config: ml_collections.ConfigDict | None = None,
) -> None:
    """Writes a diffusers pipeline folder from a workdir or from components.

    Args:
      workdir_or_components: a workdir (its EMA params, or online ones with `raw`), or
        {"unet": ImportedModel, "vae": ImportedModel with extras["scaling_factor"],
        optionally "text_encoder" (CLIP) with "tokenizer" (its folder), and "schedule"
        (default: Stable Diffusion's)}.
      out_dir: the folder to write; it must not exist or be empty.
      raw: a workdir's online params instead of their EMA.
      config: a workdir's config with overrides (its mesh), default its own.
    """
    out_path = storage.as_path(out_dir)
    if out_path.exists() and any(out_path.iterdir()):
        raise FileExistsError(f"--out={out_dir} exists and is not empty")
    if isinstance(workdir_or_components, str):
        components = workdir_components(workdir_or_components, raw, config)
    else:
        components = {"schedule": single_file.SD_SCHEDULE, **workdir_or_components}
        components["schedule"] = {"prediction_type": "epsilon", **components["schedule"]}
    save_diffusers_pipeline(out_dir, **components)


def export_workdir(
    workdir: str,
    to: str,
    out: str,
    raw: bool = False,
    config: ml_collections.ConfigDict | None = None,
) -> str:
    """Writes a workdir's model as a diffusers pipeline folder or one safetensors file,
    loading it on the mesh of its config (or of ``config``, the workdir's with overrides)."""
    if to not in EXPORT_FORMATS:
        raise ValueError(f"--to={to!r} is not a format; choose one of {EXPORT_FORMATS}")
    config = config_lib.load_workdir_config(workdir) if config is None else config
    if to == "diffusers":
        export_diffusers(workdir, out, raw, config)
        if config.diffusion.text_encoder.kind == "scratch":
            _note_scratch_text_encoder(workdir, out)
    else:
        components = workdir_components(workdir, raw, config)
        single_file.save_single_file(
            out,
            unet=components["unet"],
            vae=components["vae"],
            text_encoder=components["text_encoder"],
        )
    return f"exported {workdir} ({'online' if raw else 'EMA'} params) to {out}"


def _note_scratch_text_encoder(workdir: str, out: str) -> None:
    """A from-scratch text encoder has no diffusers class: its tokenizer goes along."""
    source = storage.as_path(workdir) / TOKENIZER_FILE
    if source.is_file():
        storage.write_bytes(storage.join(out, "ldm_jax_tokenizer.json"), source.read_bytes())
    log.info(
        "the workdir's text encoder is this package's own (not CLIP): %s has the U-Net, "
        "autoencoder and scheduler only",
        out,
    )


def export_lora(
    workdir: str,
    out: str,
    format: str,
    raw: bool = False,
    config: ml_collections.ConfigDict | None = None,
) -> str:
    """Writes the LoRA adapters a fine-tune workdir trained as one safetensors file in the
    diffusers (peft) or the kohya layout (``ldm-jax export --what=lora --format=...``)."""
    config = config_lib.load_workdir_config(workdir) if config is None else config
    if not finetuned.is_finetune(config):
        raise ValueError(
            f"--what=lora exports the adapters of a fine-tune workdir, and {workdir} is not one "
            "(train one with --config=configs/finetune.py:lora,BASE_WORKDIR)"
        )
    _, trained, step = load.load_finetuned_parts(workdir, config, raw=raw)
    weights = finetuned.trained_lora(config, trained)
    lora_files.save_lora(out, weights, format)
    size = storage.as_path(out).stat().length
    return (
        f"exported the LoRA of {workdir} (step {step}, {'online' if raw else 'EMA'} params, "
        f"rank {weights.rank}, {format} layout, {size / 1e6:.2f} MB) to {out}"
    )
