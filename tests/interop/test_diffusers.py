"""diffusers-format directories: numerical parity with diffusers' PyTorch models, export
that diffusers loads, and the errors a user can hit."""

import dataclasses
import json
import re
import shutil

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel

from ldm_jax.interop.convert import WeightsMismatchError
from ldm_jax.interop.diffusers import (
    load_diffusers_unet,
    load_diffusers_vae,
    save_diffusers_unet,
    save_diffusers_vae,
    unet_from_diffusers_config,
    unet_params_from_state_dict,
    unet_to_diffusers_config,
    vae_from_diffusers_config,
    vae_to_diffusers_config,
)
from ldm_jax.interop.safetensors_io import PickleRefusedError, read_safetensors, write_safetensors
from ldm_jax.models import AutoencoderKL, UNet

# Torch's worker threads spin while XLA holds the (few) cores: one thread is many times faster.
torch.set_num_threads(1)

TOLERANCE = 1e-4
BATCH, SIZE, IMAGE_SIZE, CONTEXT_LENGTH = 2, 8, 16, 3
TINY_UNET = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
UNET_VARIANTS = {
    # Stable Diffusion 1: cross-attention, 1x1 conv proj_in/proj_out, one head count.
    "sd1": dict(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=2,
        **TINY_UNET,
    ),
    # Stable Diffusion 2: linear projections, per-level heads of width 8, upcast attention;
    # and per-level transformer depths (two blocks in the mid block).
    "sd2": dict(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
        transformer_layers_per_block=(1, 2),
        **TINY_UNET,
    ),
    # Class labels, no attention at all, and the non-default timestep features and eps.
    "classes": dict(
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D",
        num_class_embeds=4,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
        **TINY_UNET,
    ),
}
VAE_VARIANTS = {
    "f2_no_mid_attention": dict(
        block_out_channels=(16, 32),
        latent_channels=4,
        layers_per_block=2,
        mid_block_add_attention=False,
        scaling_factor=0.5,
    ),
    "f4": dict(block_out_channels=(16, 16, 32), latent_channels=3),
}


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Adds small noise to every parameter, so the zero-initialised ones matter too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def write_diffusers_unet(variant: str, path) -> UNet2DConditionModel:
    torch.manual_seed(0)
    model = randomized(UNet2DConditionModel(sample_size=SIZE, **UNET_VARIANTS[variant]))
    model.save_pretrained(path)
    return model


def write_diffusers_vae(variant: str, path) -> DiffusersAutoencoderKL:
    torch.manual_seed(0)
    levels = len(VAE_VARIANTS[variant]["block_out_channels"])
    model = DiffusersAutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        **VAE_VARIANTS[variant],
    )
    randomized(model).save_pretrained(path)
    return model


def state_dict_of(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: value.numpy() for name, value in model.state_dict().items()}


def module_fields(module) -> dict:
    return {
        field.name: getattr(module, field.name)
        for field in dataclasses.fields(module)
        if field.name not in ("parent", "name")
    }


def unet_inputs(unet: UNet) -> tuple:
    """NHWC latents, timesteps, and a context and labels exactly when `unet` takes them."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, SIZE, SIZE, unet.in_channels)).astype(np.float32)
    timesteps = np.array([3, 700])
    context = None
    if unet.context_dim is not None:
        shape = (BATCH, CONTEXT_LENGTH, unet.context_dim)
        context = rng.normal(size=shape).astype(np.float32)
    labels = None if unet.num_classes is None else np.array([0, unet.num_classes])
    return x, timesteps, context, labels


def diffusers_unet_output(model, x, timesteps, context, labels) -> np.ndarray:
    as_torch = lambda array: None if array is None else torch.from_numpy(array)
    with torch.no_grad():
        out = model(
            torch.from_numpy(x.transpose(0, 3, 1, 2)),
            torch.from_numpy(timesteps),
            encoder_hidden_states=as_torch(context),
            class_labels=as_torch(labels),
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


def vae_inputs(vae: AutoencoderKL) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.uniform(-1.0, 1.0, size=(BATCH, IMAGE_SIZE, IMAGE_SIZE, vae.in_channels))
    latent_size = IMAGE_SIZE // vae.downsample_factor
    latents = rng.normal(size=(BATCH, latent_size, latent_size, vae.latent_channels))
    return images.astype(np.float32), latents.astype(np.float32)


def diffusers_vae_outputs(model, images, latents) -> tuple[np.ndarray, np.ndarray]:
    """The posterior mean of `images` and the decoding of `latents`, NHWC."""
    with torch.no_grad():
        mean = model.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist.mean
        decoded = model.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2))).sample
    return mean.numpy().transpose(0, 2, 3, 1), decoded.numpy().transpose(0, 2, 3, 1)


def assert_loads_into_diffusers_unchanged(model_class, out_dir, reference) -> torch.nn.Module:
    reloaded, info = model_class.from_pretrained(str(out_dir), output_loading_info=True)
    assert {key: value for key, value in info.items() if value} == {}
    expected = reference.state_dict()
    assert reloaded.state_dict().keys() == expected.keys()
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
    return reloaded


def max_abs_diff(ours, expected) -> float:
    assert np.shape(ours) == np.shape(expected)
    return float(np.max(np.abs(np.asarray(ours) - expected)))


# ---------------------------------------------------------------------------------------------
# U-Net
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(UNET_VARIANTS))
def diffusers_unet(request, tmp_path_factory):
    """(variant, diffusers model, its saved directory, the import of that directory)."""
    path = tmp_path_factory.mktemp(f"unet_{request.param}")
    model = write_diffusers_unet(request.param, path)
    return request.param, model, str(path), load_diffusers_unet(str(path))


def test_imported_unet_matches_diffusers(diffusers_unet):
    variant, reference, _, imported = diffusers_unet
    inputs = unet_inputs(imported.module)
    ours = jax.jit(imported.module.apply)({"params": imported.params}, *inputs)
    diff = max_abs_diff(ours, diffusers_unet_output(reference, *inputs))
    print(f"U-Net {variant}: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_unet_config_maps_heads_depths_mid_block_and_classes(diffusers_unet):
    variant, _, _, imported = diffusers_unet
    unet = imported.module
    expected = {
        "sd1": dict(num_attention_heads=2, context_dim=24, mid_block_attention=True),
        "sd2": dict(num_attention_heads=(2, 4), transformer_depth=(1, 2), context_dim=24),
        # diffusers' 4 class rows are 3 classes and the null class.
        "classes": dict(num_classes=3, context_dim=None, mid_block_attention=False),
    }[variant]
    assert {key: getattr(unet, key) for key in expected} == expected
    assert unet.attention_levels == ((False, False) if variant == "classes" else (True, False))
    assert module_fields(unet_from_diffusers_config(unet_to_diffusers_config(unet))) == (
        module_fields(unet)
    )


def test_exported_unet_loads_into_diffusers_unchanged(diffusers_unet, tmp_path):
    _, reference, _, imported = diffusers_unet
    save_diffusers_unet(imported.module, imported.params, str(tmp_path), sample_size=SIZE)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel" and "_diffusers_version" in config
    assert config["sample_size"] == SIZE
    reloaded = assert_loads_into_diffusers_unchanged(UNet2DConditionModel, tmp_path, reference)
    inputs = unet_inputs(imported.module)
    np.testing.assert_array_equal(
        diffusers_unet_output(reloaded, *inputs), diffusers_unet_output(reference, *inputs)
    )


def test_class_conditional_unet_attending_without_context_exports_exactly(tmp_path):
    """Attention without a context (our class-conditional models): `attn2` attends to the
    features, as diffusers with `encoder_hidden_states=None` and per-level widths."""
    unet = UNet(
        attention_levels=(True, False),
        mid_block_attention=False,
        num_attention_heads=2,
        num_classes=3,
        **TINY_UNET,
    )
    config = unet_to_diffusers_config(unet)
    assert config["cross_attention_dim"] == [16, 32] and config["num_class_embeds"] == 4
    torch.manual_seed(0)
    reference = randomized(UNet2DConditionModel.from_config(config))
    params = unet_params_from_state_dict(unet, state_dict_of(reference))
    save_diffusers_unet(unet, params, str(tmp_path))
    assert_loads_into_diffusers_unchanged(UNet2DConditionModel, tmp_path, reference)
    inputs = unet_inputs(unet)
    ours = jax.jit(unet.apply)({"params": params}, *inputs)
    diff = max_abs_diff(ours, diffusers_unet_output(reference, *inputs))
    print(f"U-Net class-conditional self-attention: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize(
    "fields",
    [
        dict(attention_levels=(False, True), mid_block_attention=False, context_dim=8),
        dict(num_attention_heads=(2, 8), transformer_depth=(3, 1), use_linear_projection=True),
        dict(attention_levels=(False, False), mid_block_attention=False, num_classes=0),
    ],
    ids=["mid-resnet-only", "per-level", "no-attention"],
)
def test_every_unet_is_a_diffusers_unet_of_the_same_weights(fields):
    unet = UNet(**{**TINY_UNET, "attention_levels": (True, False), **fields})
    config = unet_to_diffusers_config(unet)
    assert module_fields(unet_from_diffusers_config(config)) == module_fields(unet)
    # Raises unless diffusers builds exactly the same tensors (names and shapes).
    unet_params_from_state_dict(unet, state_dict_of(UNet2DConditionModel.from_config(config)))


# ---------------------------------------------------------------------------------------------
# Autoencoder
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(VAE_VARIANTS))
def diffusers_vae(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"vae_{request.param}")
    model = write_diffusers_vae(request.param, path)
    return request.param, model, str(path), load_diffusers_vae(str(path))


def test_imported_vae_matches_diffusers(diffusers_vae):
    variant, reference, _, imported = diffusers_vae
    vae = imported.module
    assert vae.downsample_factor == (2 if variant.startswith("f2") else 4)
    assert vae.mid_block_attention == VAE_VARIANTS[variant].get("mid_block_add_attention", True)
    assert imported.extras == {
        "scaling_factor": VAE_VARIANTS[variant].get("scaling_factor", 0.18215)
    }

    @jax.jit
    def encode_mean_and_decode(params, images, latents):
        variables = {"params": params}
        mean = vae.apply(variables, images, method=vae.encode).mean
        return mean, vae.apply(variables, latents, method=vae.decode)

    images, latents = vae_inputs(vae)
    ours = encode_mean_and_decode(imported.params, images, latents)
    expected = diffusers_vae_outputs(reference, images, latents)
    diffs = [max_abs_diff(a, b) for a, b in zip(ours, expected, strict=True)]
    print(f"VAE {variant}: max abs diff posterior mean {diffs[0]:.2e}, decoded {diffs[1]:.2e}")
    assert max(diffs) <= TOLERANCE


def test_exported_vae_loads_into_diffusers_unchanged(diffusers_vae, tmp_path):
    _, reference, _, imported = diffusers_vae
    scaling_factor = imported.extras["scaling_factor"]
    save_diffusers_vae(imported.module, imported.params, str(tmp_path), scaling_factor)
    reloaded = assert_loads_into_diffusers_unchanged(DiffusersAutoencoderKL, tmp_path, reference)
    assert reloaded.config.scaling_factor == scaling_factor
    images, latents = vae_inputs(imported.module)
    for ours, expected in zip(
        diffusers_vae_outputs(reloaded, images, latents),
        diffusers_vae_outputs(reference, images, latents),
        strict=True,
    ):
        np.testing.assert_array_equal(ours, expected)


def test_vae_with_pre_0_14_attention_names_loads_the_same(diffusers_vae, tmp_path):
    _, _, path, imported = diffusers_vae
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    pattern = re.compile(r"\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.")
    old = {
        pattern.sub(lambda m: f".attentions.0.{old_names[m.group(1)]}.", name): value
        for name, value in read_safetensors(f"{path}/diffusion_pytorch_model.safetensors").items()
    }
    assert any(".query." in name for name in old) == imported.module.mid_block_attention
    shutil.copy(f"{path}/config.json", tmp_path / "config.json")
    write_safetensors(old, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    legacy = load_diffusers_vae(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, legacy.params, imported.params)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_weights_of_another_shape_name_the_tensor_and_both_shapes(tmp_path):
    write_diffusers_unet("sd1", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["block_out_channels"] = [16, 48]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsMismatchError) as error:
        load_diffusers_unet(str(tmp_path))
    found = re.search(r"'(\S+)' has shape \(([\d, ]+)\) .* expects \(([\d, ]+)\)", str(error.value))
    assert found, str(error.value)
    name, stored, expected = (
        found.group(1),
        *(tuple(int(n) for n in re.findall(r"\d+", group)) for group in found.groups()[1:]),
    )
    weights = read_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert weights[name].shape == stored != expected


def test_unsupported_option_in_a_directory_names_the_key(tmp_path):
    write_diffusers_unet("classes", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["resnet_time_scale_shift"] = "scale_shift"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="resnet_time_scale_shift='scale_shift'"):
        load_diffusers_unet(str(tmp_path))


@pytest.mark.parametrize(
    "key,value",
    [
        ("addition_embed_type", "text_time"),
        ("class_embed_type", "timestep"),
        ("time_embedding_type", "fourier"),
        ("only_cross_attention", [True, False]),
        ("dual_cross_attention", True),
        ("encoder_hid_dim", 32),
        ("conv_in_kernel", 7),
        ("act_fn", "gelu"),
        ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
        ("up_block_types", ["CrossAttnUpBlock2D", "UpBlock2D"]),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("attention_head_dim", 3),
        ("transformer_layers_per_block", [[1], [2]]),
        ("layers_per_block", [1, 2]),
        ("cross_attention_dim", [8, 12]),
    ],
)
def test_unsupported_unet_options_raise_naming_the_key(key, value):
    config = unet_to_diffusers_config(UNet(attention_levels=(True, False), context_dim=8))
    with pytest.raises(ValueError, match=f"config {re.escape(key)}="):
        unet_from_diffusers_config({**config, key: value})


@pytest.mark.parametrize(
    "key,value",
    [
        ("shift_factor", 0.1159),
        ("latents_mean", [0.0, 0.0, 0.0, 0.0]),
        ("use_quant_conv", False),
        ("use_post_quant_conv", False),
        ("up_block_types", ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]),
        ("act_fn", "relu"),
    ],
)
def test_unsupported_vae_options_raise_naming_the_key(key, value):
    config = vae_to_diffusers_config(AutoencoderKL(block_out_channels=(8, 8)), 0.18215)
    with pytest.raises(ValueError, match=f"config {re.escape(key)}="):
        vae_from_diffusers_config({**config, key: value})


def test_a_config_of_another_class_is_refused():
    config = vae_to_diffusers_config(AutoencoderKL(), 0.18215)
    with pytest.raises(ValueError, match="AutoencoderKL, not of a UNet2DConditionModel"):
        unet_from_diffusers_config(config)


def test_pickled_weights_are_refused(tmp_path):
    model = torch.nn.Linear(2, 2)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    torch.save(model.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="diffusion_pytorch_model.bin"):
        load_diffusers_vae(str(tmp_path))
    torch.save(model.state_dict(), tmp_path / "model.ckpt")
    with pytest.raises(PickleRefusedError, match="model.ckpt"):
        load_diffusers_unet(str(tmp_path / "model.ckpt"))
