"""Original Stable Diffusion single files: the name mapping checked against diffusers' own
converter, save -> load parity with diffusers' and transformers' PyTorch models, and the
errors a user can hit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)

from ldm_jax.interop.clip import load_clip_text_encoder
from ldm_jax.interop.convert import ImportedModel
from ldm_jax.interop.diffusers import (
    unet_from_diffusers_config,
    unet_params_from_state_dict,
    vae_from_diffusers_config,
    vae_params_from_state_dict,
)
from ldm_jax.interop.safetensors_io import PickleRefusedError, read_safetensors, write_safetensors
from ldm_jax.interop.single_file import load_single_file, save_single_file, schedule_of
from ldm_jax.interop.single_file_config import unet_config_from_original, vae_config_from_original
from ldm_jax.interop.single_file_names import (
    AutoencoderLayout,
    UNetLayout,
    autoencoder_to_original,
    open_clip_to_transformers,
    transformers_to_open_clip,
    unet_to_original,
)

TOLERANCE = 1e-4
BATCH, LATENT_SIZE, IMAGE_SIZE, TEXT_LENGTH, TEXT_WIDTH = 2, 8, 16, 5, 32
UNET_CONFIGS = {
    # Stable Diffusion 1: 1x1 conv projections, 8 heads; upsampler after a plain level.
    "sd1": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
    ),
    # Stable Diffusion 2: linear projections, per-level heads (of width 32 here, 64 in SD 2),
    # two transformer blocks, class labels (as the x4 upscaler); upsampler after attention.
    "sd2": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=(1, 2),
        use_linear_projection=True,
        transformer_layers_per_block=2,
        num_class_embeds=5,
    ),
}
# What the shapes cannot tell: `head_width` (heads = channels // width) when not SD 2's 64.
HEAD_WIDTHS = {"sd1": None, "sd2": 32}
VAE_CONFIG = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)
# SD 1's text encoder is OpenAI CLIP (quick_gelu), SD 2's OpenCLIP (gelu).
TEXT_CONFIG = dict(
    vocab_size=99,
    hidden_size=TEXT_WIDTH,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=TEXT_LENGTH,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Adds noise to every parameter, so that zero- and one-initialised ones matter too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}


def torch_unet(variant: str) -> UNet2DConditionModel:
    return randomized(UNet2DConditionModel(sample_size=LATENT_SIZE, **UNET_CONFIGS[variant]))


def torch_vae() -> DiffusersAutoencoderKL:
    return randomized(DiffusersAutoencoderKL(sample_size=IMAGE_SIZE, **VAE_CONFIG), seed=1)


def torch_text_encoder(activation: str) -> transformers.CLIPTextModel:
    config = transformers.CLIPTextConfig(hidden_act=activation, **TEXT_CONFIG)
    return randomized(transformers.CLIPTextModel(config), seed=2)


def unet_layout(config: dict) -> UNetLayout:
    return UNetLayout(
        levels=len(config["block_out_channels"]),
        layers_per_block=config["layers_per_block"],
        attention_levels=tuple(t.startswith("CrossAttn") for t in config["down_block_types"]),
        mid_block_attention=True,
    )


VAE_LAYOUT = AutoencoderLayout(levels=2, layers_per_block=1, mid_block_attention=True)


def as_torch(tensors: dict[str, np.ndarray], prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + name: torch.from_numpy(value) for name, value in tensors.items()}


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(np.asarray(actual[name]), np.asarray(value), err_msg=name)


# ---------------------------------------------------------------------------------------------
# The names, against diffusers' own converter
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(UNET_CONFIGS))
def test_diffusers_converter_reads_exported_unet_names_back(variant):
    model = torch_unet(variant)
    state_dict = numpy_state_dict(model)
    original = unet_to_original(state_dict, unet_layout(UNET_CONFIGS[variant]))
    converted = convert_ldm_unet_checkpoint(
        as_torch(original, "model.diffusion_model."), dict(model.config)
    )
    assert_same_tensors(converted, state_dict)


def test_diffusers_converter_reads_exported_vae_names_back():
    model = torch_vae()
    state_dict = numpy_state_dict(model)
    original = autoencoder_to_original(state_dict, VAE_LAYOUT)
    assert original["encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 convs, as the originals
    converted = convert_ldm_vae_checkpoint(
        as_torch(original, "first_stage_model."), dict(model.config)
    )
    assert_same_tensors(converted, state_dict)


def test_diffusers_converter_reads_exported_open_clip_names_back():
    model = torch_text_encoder("gelu")
    # Original files name CLIP as transformers 4 did, under `text_model.`.
    state_dict = {f"text_model.{name}": value for name, value in numpy_state_dict(model).items()}
    original = as_torch(transformers_to_open_clip(state_dict), "cond_stage_model.model.")
    converted = convert_open_clip_checkpoint(model, original)
    assert_same_tensors(converted, state_dict)
    assert_same_tensors(
        open_clip_to_transformers(transformers_to_open_clip(state_dict)), state_dict
    )


def assert_config_has(model, inferred: dict) -> None:
    assert inferred.pop("_class_name") == type(model).__name__
    config = model.config
    for key, value in inferred.items():
        expected = config[key]
        assert value == (list(expected) if isinstance(expected, (list, tuple)) else expected), key


@pytest.mark.parametrize("variant", sorted(UNET_CONFIGS))
def test_unet_architecture_read_off_the_tensor_shapes(variant):
    model = torch_unet(variant)
    original = unet_to_original(numpy_state_dict(model), unet_layout(UNET_CONFIGS[variant]))
    inferred = unet_config_from_original(original, head_width=HEAD_WIDTHS[variant])
    assert_config_has(model, inferred)
    assert unet_config_from_original(original, num_heads=2)["attention_head_dim"] == 2
    if variant == "sd2":  # linear projections default to SD 2's heads of width 64
        with pytest.raises(ValueError, match="head_width=64 does not divide"):
            unet_config_from_original(original)


def test_autoencoder_architecture_read_off_the_tensor_shapes():
    model = torch_vae()
    original = autoencoder_to_original(numpy_state_dict(model), VAE_LAYOUT)
    assert_config_has(model, vae_config_from_original(original))


# ---------------------------------------------------------------------------------------------
# End to end: save_single_file -> load_single_file -> the PyTorch models' outputs
# ---------------------------------------------------------------------------------------------
def imported_unet(model: UNet2DConditionModel) -> ImportedModel:
    unet = unet_from_diffusers_config(dict(model.config))
    return ImportedModel(unet, unet_params_from_state_dict(unet, numpy_state_dict(model)))


def imported_vae(model: DiffusersAutoencoderKL) -> ImportedModel:
    vae = vae_from_diffusers_config(dict(model.config))
    return ImportedModel(vae, vae_params_from_state_dict(vae, numpy_state_dict(model)))


def imported_text_encoder(model: transformers.CLIPTextModel, directory) -> ImportedModel:
    model.save_pretrained(directory)
    return load_clip_text_encoder(directory)


def assert_unet_matches(imported: ImportedModel, model: UNet2DConditionModel) -> None:
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(BATCH, LATENT_SIZE, LATENT_SIZE, 4)).astype(np.float32)
    context = rng.normal(size=(BATCH, TEXT_LENGTH, TEXT_WIDTH)).astype(np.float32)
    timesteps = np.array([3, 800])
    labels = None if model.config.num_class_embeds is None else np.array([0, 4])
    with torch.no_grad():
        expected = model(
            torch.from_numpy(latents.transpose(0, 3, 1, 2)),
            torch.from_numpy(timesteps),
            encoder_hidden_states=torch.from_numpy(context),
            class_labels=None if labels is None else torch.from_numpy(labels),
        ).sample.numpy()
    apply = jax.jit(imported.module.apply)
    actual = apply({"params": imported.params}, latents, timesteps, context, labels)
    np.testing.assert_allclose(actual, expected.transpose(0, 2, 3, 1), atol=TOLERANCE)


def assert_vae_matches(imported: ImportedModel, model: DiffusersAutoencoderKL) -> None:
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, size=(BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
        decoded = model.decode(posterior.mean).sample.numpy().transpose(0, 2, 3, 1)
    latents = posterior.mean.numpy().transpose(0, 2, 3, 1)
    module = imported.module

    @jax.jit
    def encode_and_decode(variables, images, latents):
        mean = module.apply(variables, images, method=module.encode).mean
        return mean, module.apply(variables, latents, method=module.decode)

    mean, images_out = encode_and_decode({"params": imported.params}, images, latents)
    np.testing.assert_allclose(mean, latents, atol=TOLERANCE)
    np.testing.assert_allclose(images_out, decoded, atol=TOLERANCE)


def assert_text_encoder_matches(imported: ImportedModel, model: transformers.CLIPTextModel):
    token_ids = np.random.default_rng(2).integers(0, 99, (BATCH, TEXT_LENGTH)).astype(np.int32)
    with torch.no_grad():
        expected = model(torch.from_numpy(token_ids).long()).last_hidden_state.numpy()
    actual = jax.jit(imported.module.apply)({"params": imported.params}, jnp.asarray(token_ids))
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE)


def test_stable_diffusion_1_file_round_trip(tmp_path):
    unet, vae, text_encoder = torch_unet("sd1"), torch_vae(), torch_text_encoder("quick_gelu")
    path = str(tmp_path / "sd1.safetensors")
    imported = dict(
        unet=imported_unet(unet),
        vae=imported_vae(vae),
        text_encoder=imported_text_encoder(text_encoder, tmp_path / "text_encoder"),
    )
    save_single_file(path, **imported)
    written = read_safetensors(path)
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in written
    # What original training checkpoints carry beside the weights is passed over.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float32) ** 2
    extra = {"betas": betas, "model_ema.decay": np.ones(()), "scale_factor": np.array(0.5)}
    write_safetensors({**written, **extra}, path)

    loaded = load_single_file(path, text_encoder_heads=4)

    assert sorted(loaded) == ["text_encoder", "unet", "vae"]
    for name, part in imported.items():
        assert loaded[name].module == part.module, name
    assert loaded["vae"].extras["scaling_factor"] == 0.5
    assert schedule_of(loaded)["beta_end"] == 0.012
    assert schedule_of(loaded)["prediction_type"] == "epsilon"
    assert_unet_matches(loaded["unet"], unet)
    assert_vae_matches(loaded["vae"], vae)
    assert_text_encoder_matches(loaded["text_encoder"], text_encoder)


def test_stable_diffusion_2_file_round_trip(tmp_path):
    unet, text_encoder = torch_unet("sd2"), torch_text_encoder("gelu")
    path = str(tmp_path / "sd2.safetensors")
    imported = dict(
        unet=imported_unet(unet),
        text_encoder=imported_text_encoder(text_encoder, tmp_path / "text_encoder"),
    )
    save_single_file(path, **imported)
    written = read_safetensors(path)
    # OpenCLIP names, one more block than the text model: SD 2 reads the penultimate one.
    blocks = {name.split(".")[4] for name in written if ".resblocks." in name}
    assert blocks == {"0", "1", "2"}

    loaded = load_single_file(
        path, prediction_type="v", head_width=HEAD_WIDTHS["sd2"], text_encoder_heads=4
    )

    assert sorted(loaded) == ["text_encoder", "unet"]
    for name, part in imported.items():
        assert loaded[name].module == part.module, name
    assert loaded["unet"].extras["prediction_type"] == "v"
    assert_unet_matches(loaded["unet"], unet)
    assert_text_encoder_matches(loaded["text_encoder"], text_encoder)


# ---------------------------------------------------------------------------------------------
# Errors a user can hit
# ---------------------------------------------------------------------------------------------
def test_pickled_checkpoint_is_refused_with_the_conversion_command(tmp_path):
    path = tmp_path / "sd-v1-4.ckpt"
    path.write_bytes(b"\x80\x04unpickle me")
    with pytest.raises(PickleRefusedError, match="Convert it once.*safetensors"):
        load_single_file(path)


def test_file_without_unet_is_named(tmp_path):
    path = str(tmp_path / "vae_only.safetensors")
    write_safetensors({"first_stage_model.encoder.conv_in.weight": np.zeros((8, 3, 3, 3))}, path)
    with pytest.raises(ValueError, match="holds no U-Net.*model.diffusion_model"):
        load_single_file(path)


def test_unknown_tensors_are_listed(tmp_path):
    path = str(tmp_path / "sdxl.safetensors")
    tensors = {
        "model.diffusion_model.input_blocks.0.0.weight": np.zeros((32, 4, 3, 3)),
        "conditioner.embedders.1.model.ln_final.weight": np.zeros(4),
        "model_ema.num_updates": np.zeros(()),
    }
    write_safetensors(tensors, path)
    with pytest.raises(ValueError, match=r"1 tensors.*conditioner\.embedders\.1\.model"):
        load_single_file(path)


def test_unet_tensors_of_unsupported_blocks_are_listed(tmp_path):
    model = torch_unet("sd1")
    original = unet_to_original(numpy_state_dict(model), unet_layout(UNET_CONFIGS["sd1"]))
    # CompVis' plain attention (qkv as one 1D conv) beside spatial transformers.
    original["input_blocks.3.1.qkv.weight"] = np.zeros((192, 64, 1))
    path = str(tmp_path / "legacy_attention.safetensors")
    write_safetensors({f"model.diffusion_model.{k}": v for k, v in original.items()}, path)
    with pytest.raises(ValueError, match=r"U-Net tensors.*input_blocks\.3\.1\.qkv"):
        load_single_file(path)
