"""Whole pipelines: diffusers' `model_index.json` layout in, and out.

A diffusers pipeline directory holds one folder per component. Two layouts are read and
written:

* `StableDiffusionPipeline`: `unet/`, `vae/` (an `AutoencoderKL`), `scheduler/`, and with a
  CLIP text encoder `text_encoder/` and `tokenizer/`;
* `LDMPipeline` (the unconditional CompVis LDMs, e.g. the hub's CompVis/ldm-celebahq-256):
  `unet/` (a `UNet2DModel`), `vqvae/` (a `VQModel`) and `scheduler/`.

`load_diffusers_pipeline` reads the components a latent diffusion model needs;
`save_diffusers_pipeline` writes the layout of the autoencoder's kind (VQ: `LDMPipeline`),
loadable by that diffusers pipeline's `from_pretrained`.
"""

from __future__ import annotations

import json
from typing import Any

from ldm_jax import storage
from ldm_jax.interop import clip as clip_interop
from ldm_jax.interop import diffusers as diffusers_interop
from ldm_jax.interop.clip import copy_tokenizer
from ldm_jax.interop.convert import ImportedModel
from ldm_jax.interop.diffusers_config import (
    DIFFUSERS_VERSION,
    PLAIN_UNET_CLASS_NAME,
    unet_diffusers_class,
)
from ldm_jax.models import VQAutoencoder

# diffusers' beta_schedule / prediction_type names to ours, and back.
BETA_SCHEDULES = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "squaredcos_cap_v2": "cosine",
}
PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}
# The autoencoder's folder: `vqvae/` in an LDMPipeline, `vae/` in the others.
VQ_AUTOENCODER_FOLDER, AUTOENCODER_FOLDER = "vqvae", "vae"


def autoencoder_folder(autoencoder: Any) -> str:
    """The pipeline folder of an autoencoder module: `vqvae` for a VQ one, else `vae`."""
    return VQ_AUTOENCODER_FOLDER if isinstance(autoencoder, VQAutoencoder) else AUTOENCODER_FOLDER


def _invert(table: dict[str, str]) -> dict[str, str]:
    return {ours: theirs for theirs, ours in table.items()}


def schedule_from_scheduler_config(config: dict) -> dict[str, Any]:
    """Our schedule settings from a diffusers `scheduler_config.json`.

    Raises:
      ValueError: a beta schedule or prediction type we do not have (named).
    """
    beta_schedule = config.get("beta_schedule", "linear")
    prediction_type = config.get("prediction_type", "epsilon")
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(
            f"scheduler_config.json: beta_schedule={beta_schedule!r} is not supported; "
            f"supported: {sorted(BETA_SCHEDULES)}"
        )
    if config.get("trained_betas") is not None:
        raise ValueError("scheduler_config.json: trained_betas are not supported")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"scheduler_config.json: prediction_type={prediction_type!r} is not supported; "
            f"supported: {sorted(PREDICTION_TYPES)}"
        )
    return dict(
        schedule=BETA_SCHEDULES[beta_schedule],
        num_timesteps=int(config.get("num_train_timesteps", 1000)),
        beta_start=float(config.get("beta_start", 0.0001)),
        beta_end=float(config.get("beta_end", 0.02)),
        prediction_type=PREDICTION_TYPES[prediction_type],
        timestep_spacing=config.get("timestep_spacing", "leading"),
        steps_offset=int(config.get("steps_offset", 0)),
        set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
    )


def scheduler_config(schedule: dict[str, Any]) -> dict[str, Any]:
    """A diffusers DDIMScheduler config for our schedule settings (the keys of the above)."""
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_schedule": _invert(BETA_SCHEDULES)[schedule["schedule"]],
        "beta_start": schedule["beta_start"],
        "beta_end": schedule["beta_end"],
        "num_train_timesteps": schedule["num_timesteps"],
        "prediction_type": _invert(PREDICTION_TYPES)[schedule["prediction_type"]],
        "timestep_spacing": schedule["timestep_spacing"],
        "steps_offset": schedule["steps_offset"],
        "clip_sample": False,
        "set_alpha_to_one": schedule["set_alpha_to_one"],
    }


def _read_json(path: str) -> dict:
    file = storage.as_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path} not found")
    return json.loads(file.read_text())


def load_diffusers_pipeline(path: str) -> dict[str, Any]:
    """Reads a diffusers pipeline directory (`model_index.json` layout).

    An `LDMPipeline`'s autoencoder is its `vqvae/`. A `VQModel`'s latent scale is the
    `scaling_factor` of its `config.json`, or 1.0 when that has none: the LDMs on the hub
    (written before diffusers had the key) were trained on unscaled latents, and diffusers'
    default 0.18215, which its `LDMPipeline` divides by since 0.22, garbles them (diffusers
    issue #6725).

    Returns:
      {"unet": ImportedModel, "vae": ImportedModel (the autoencoder; extras:
      scaling_factor), "text_encoder": ImportedModel or None, "tokenizer": the tokenizer
      folder or None, "schedule": our schedule settings (see
      `schedule_from_scheduler_config`), "sample_size": the U-Net's latent size}.

    Raises:
      FileNotFoundError: `model_index.json` or a component is missing (named).
    """
    index = _read_json(storage.join(path, "model_index.json"))
    folder = VQ_AUTOENCODER_FOLDER if VQ_AUTOENCODER_FOLDER in index else AUTOENCODER_FOLDER
    for component in ("unet", folder):
        if component not in index:
            raise FileNotFoundError(f"{path}/model_index.json lists no {component!r} component")
    unet = diffusers_interop.load_diffusers_unet(storage.join(path, "unet"))
    sample_size = _read_json(storage.join(path, "unet", "config.json")).get("sample_size") or 64
    vae = diffusers_interop.load_diffusers_vae(storage.join(path, folder))
    vae_config = _read_json(storage.join(path, folder, "config.json"))
    if isinstance(vae.module, VQAutoencoder) and "scaling_factor" not in vae_config:
        vae = ImportedModel(vae.module, vae.params, {**vae.extras, "scaling_factor": 1.0})
    text_encoder, tokenizer = None, None
    if index.get("text_encoder", [None])[0] is not None:
        text_encoder = clip_interop.load_clip_text_encoder(storage.join(path, "text_encoder"))
        tokenizer = storage.join(path, "tokenizer")
        if not storage.as_path(tokenizer).is_dir():
            raise FileNotFoundError(f"{tokenizer} not found: the pipeline's CLIP tokenizer")
    scheduler = storage.join(path, "scheduler", "scheduler_config.json")
    schedule = schedule_from_scheduler_config(
        _read_json(scheduler) if storage.as_path(scheduler).is_file() else {}
    )
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        schedule=schedule,
        sample_size=int(sample_size),
    )


def save_diffusers_pipeline(
    out_dir: str,
    *,
    unet: ImportedModel,
    vae: ImportedModel,
    schedule: dict[str, Any],
    text_encoder: ImportedModel | None = None,
    tokenizer: str | None = None,
) -> None:
    """Writes a pipeline directory: `unet/`, the autoencoder's folder, `scheduler/` and a
    `model_index.json`; with a CLIP text encoder also `text_encoder/` and `tokenizer/`.

    A VQ autoencoder makes an `LDMPipeline` (`vqvae/`), a KL one a `StableDiffusionPipeline`
    (`vae/`). The index names the classes written (a U-Net with plain attention is a
    `UNet2DModel`).

    Raises:
      ValueError: a VQ autoencoder with a model that is not an `LDMPipeline`'s
        (unconditional, with a `UNet2DModel`), or a U-Net no diffusers class computes as.
    """
    unet_class = check_diffusers_pipeline(unet.module, vae.module, text_encoder)
    folder = autoencoder_folder(vae.module)
    out_folder = storage.as_path(out_dir)
    diffusers_interop.save_diffusers_unet(
        unet.module,
        unet.params,
        storage.join(out_dir, "unet"),
        sample_size=unet.extras.get("sample_size"),
    )
    diffusers_interop.save_diffusers_vae(
        vae.module, vae.params, storage.join(out_dir, folder), vae.extras["scaling_factor"]
    )
    (out_folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (out_folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler_config(schedule), indent=2)
    )
    index = {
        "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", unet_class],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    if folder == VQ_AUTOENCODER_FOLDER:
        index = {"_class_name": "LDMPipeline", **index, "vqvae": ["diffusers", "VQModel"]}
    else:
        index = {
            "_class_name": "StableDiffusionPipeline",
            **index,
            "vae": ["diffusers", "AutoencoderKL"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
    if text_encoder is not None:
        clip_interop.save_clip_text_encoder(
            text_encoder.module,
            text_encoder.params,
            storage.join(out_dir, "text_encoder"),
            config=text_encoder.extras.get("config"),
        )
        copy_tokenizer(tokenizer, storage.join(out_dir, "tokenizer"))
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    (out_folder / "model_index.json").write_text(json.dumps(index, indent=2))


def check_diffusers_pipeline(unet: Any, vae: Any, text_encoder: ImportedModel | None) -> str:
    """The diffusers class of `unet`, once sure a diffusers pipeline computes as the model.

    Raises:
      ValueError: no diffusers pipeline computes as this model (the message says why).
    """
    unet_class = unet_diffusers_class(unet)
    if autoencoder_folder(vae) == VQ_AUTOENCODER_FOLDER:
        _check_ldm_pipeline(unet, unet_class, text_encoder)
    return unet_class


def _check_ldm_pipeline(unet: Any, unet_class: str, text_encoder: ImportedModel | None) -> None:
    """Refuses a model with a VQ autoencoder that diffusers' LDMPipeline cannot run."""
    if text_encoder is not None or unet.num_classes is not None:
        what = "a text encoder" if text_encoder is not None else "class labels"
        raise ValueError(
            f"a model with a VQ autoencoder is written as diffusers' LDMPipeline, which is "
            f"unconditional, but this one takes {what}"
        )
    if unet_class != PLAIN_UNET_CLASS_NAME:
        raise ValueError(
            "a model with a VQ autoencoder is written as diffusers' LDMPipeline, whose unet is "
            f"a {PLAIN_UNET_CLASS_NAME} (plain attention, diffusion.unet.attention_type="
            f"'plain'), but this U-Net is a {unet_class}"
        )
