"""diffusers' UNet2DModel and VQModel (the CompVis LDMs' classes): numerical parity, export
that diffusers loads unchanged, and the options and models refused."""

import json
import re

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DModel, VQModel

from ldm_jax.interop.diffusers import (
    load_diffusers_unet,
    load_diffusers_vae,
    save_diffusers_unet,
    save_diffusers_vae,
    unet_from_diffusers_config,
    unet_params_from_state_dict,
    unet_to_diffusers_config,
    vae_from_diffusers_config,
    vae_params_from_state_dict,
    vae_to_diffusers_config,
)
from ldm_jax.models import UNet, VQAutoencoder
from tests.interop.test_diffusers import (
    BATCH,
    IMAGE_SIZE,
    SIZE,
    TOLERANCE,
    assert_loads_into_diffusers_unchanged,
    max_abs_diff,
    module_fields,
    randomized,
    state_dict_of,
    vae_inputs,
)

torch.set_num_threads(1)

TINY = dict(in_channels=3, out_channels=3, layers_per_block=1, norm_num_groups=8)
PLAIN_UNET_VARIANTS = {
    # The CelebA-HQ LDM's shape: no attention at the first level, heads 8 channels wide.
    "celebahq": dict(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        **TINY,
    ),
    # Class labels added to the time embedding, and the non-default features and eps.
    "classes": dict(
        block_out_channels=(16, 32),
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        attention_head_dim=4,
        num_class_embeds=5,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
        **TINY,
    ),
    # attention_head_dim=None: one head as wide as each level.
    "one_head": dict(
        block_out_channels=(16, 32),
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
        attention_head_dim=None,
        **TINY,
    ),
}
VQ_VARIANTS = {
    "f4": dict(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=3,
        num_vq_embeddings=64,
    ),
    # Attention at the last level (as CompVis vq-f8), none in the mid blocks.
    "f2_attention": dict(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        num_vq_embeddings=32,
        layers_per_block=2,
        mid_block_add_attention=False,
        scaling_factor=0.5,
    ),
}


def plain_unet_inputs(unet: UNet) -> tuple:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, SIZE, SIZE, unet.in_channels)).astype(np.float32)
    labels = None if unet.num_classes is None else np.array([1, unet.num_classes])
    return x, np.array([3, 700]), labels


def unet2d_output(model: UNet2DModel, x, timesteps, labels) -> np.ndarray:
    with torch.no_grad():
        out = model(
            torch.from_numpy(x.transpose(0, 3, 1, 2)),
            torch.from_numpy(timesteps),
            class_labels=None if labels is None else torch.from_numpy(labels),
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


def vq_outputs(model: VQModel, images, latents) -> tuple[np.ndarray, ...]:
    """Pre-quantisation latents of `images`, their codes, and the decoding (which quantises)
    of `latents`, NHWC."""
    with torch.no_grad():
        encoded = model.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latents
        _, _, (_, _, codes) = model.quantize(encoded)
        decoded = model.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2))).sample
    batch, _, height, width = encoded.shape
    return (
        encoded.numpy().transpose(0, 2, 3, 1),
        codes.numpy().reshape(batch, height, width),
        decoded.numpy().transpose(0, 2, 3, 1),
    )


def our_vq_outputs(imported, images, latents) -> tuple[np.ndarray, ...]:
    vq, variables = imported.module, {"params": imported.params}

    @jax.jit
    def outputs(images, latents):
        return (
            vq.apply(variables, images, method=vq.encode).mean,
            vq.apply(variables, images, method=vq.encode_indices),
            vq.apply(variables, latents, method=vq.decode),
        )

    return tuple(np.asarray(output) for output in outputs(images, latents))


# ---------------------------------------------------------------------------------------------
# UNet2DModel
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(PLAIN_UNET_VARIANTS))
def diffusers_plain_unet(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"unet2d_{request.param}")
    torch.manual_seed(0)
    model = randomized(UNet2DModel(sample_size=SIZE, **PLAIN_UNET_VARIANTS[request.param]))
    model.save_pretrained(path)
    return request.param, model, load_diffusers_unet(str(path))


def test_imported_unet2d_matches_diffusers(diffusers_plain_unet):
    variant, reference, imported = diffusers_plain_unet
    inputs = plain_unet_inputs(imported.module)
    x, timesteps, labels = inputs
    ours = jax.jit(imported.module.apply)({"params": imported.params}, x, timesteps, None, labels)
    diff = max_abs_diff(ours, unet2d_output(reference, *inputs))
    print(f"UNet2DModel {variant}: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_unet2d_config_maps_head_widths_and_classes(diffusers_plain_unet):
    variant, _, imported = diffusers_plain_unet
    unet = imported.module
    expected = {
        "celebahq": dict(num_attention_heads=(2, 4, 4), num_classes=None),
        "classes": dict(num_attention_heads=(4, 8), num_classes=4, norm_eps=1e-6),
        "one_head": dict(num_attention_heads=1, num_classes=None),
    }[variant]
    assert {key: getattr(unet, key) for key in expected} == expected
    assert (unet.attention_type, unet.context_dim, unet.mid_block_attention) == (
        "plain",
        None,
        True,
    )
    config = unet_to_diffusers_config(unet)
    assert config["_class_name"] == "UNet2DModel"
    assert config["attention_head_dim"] == PLAIN_UNET_VARIANTS[variant]["attention_head_dim"]
    assert module_fields(unet_from_diffusers_config(config)) == module_fields(unet)


def test_exported_unet2d_loads_into_diffusers_unchanged(diffusers_plain_unet, tmp_path):
    _, reference, imported = diffusers_plain_unet
    save_diffusers_unet(imported.module, imported.params, str(tmp_path), sample_size=SIZE)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "UNet2DModel"
    reloaded = assert_loads_into_diffusers_unchanged(UNet2DModel, tmp_path, reference)
    inputs = plain_unet_inputs(imported.module)
    np.testing.assert_array_equal(
        unet2d_output(reloaded, *inputs), unet2d_output(reference, *inputs)
    )


@pytest.mark.parametrize(
    "fields",
    [
        dict(attention_levels=(False, True), num_attention_heads=(2, 4)),
        dict(attention_levels=(False, False), num_attention_heads=(1, 2), num_classes=0),
        dict(attention_levels=(True, True), num_attention_heads=1, block_out_channels=(8, 16)),
    ],
    ids=["one-level", "mid-only", "one-head"],
)
def test_every_plain_unet_is_a_unet2d_of_the_same_weights(fields):
    unet = UNet(**{**TINY, "block_out_channels": (16, 32), "attention_type": "plain", **fields})
    config = unet_to_diffusers_config(unet)
    assert config["_class_name"] == "UNet2DModel"
    assert module_fields(unet_from_diffusers_config(config)) == module_fields(unet)
    # Raises unless diffusers builds exactly the same tensors (names and shapes).
    unet_params_from_state_dict(unet, state_dict_of(UNet2DModel.from_config(config)))


# ---------------------------------------------------------------------------------------------
# VQModel
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(VQ_VARIANTS))
def diffusers_vq(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"vq_{request.param}")
    torch.manual_seed(0)
    model = randomized(
        VQModel(norm_num_groups=8, sample_size=IMAGE_SIZE, **VQ_VARIANTS[request.param])
    )
    model.save_pretrained(path)
    return request.param, model, load_diffusers_vae(str(path))


def test_imported_vq_model_matches_diffusers(diffusers_vq):
    variant, reference, imported = diffusers_vq
    spec = VQ_VARIANTS[variant]
    vq = imported.module
    assert isinstance(vq, VQAutoencoder)
    assert vq.num_embeddings == spec["num_vq_embeddings"]
    assert vq.attention_levels == ((False, True) if "attention" in variant else ())
    assert imported.extras == {"scaling_factor": spec.get("scaling_factor", 0.18215)}
    images, latents = vae_inputs(vq)
    ours = our_vq_outputs(imported, images, latents)
    encoded, codes, decoded = vq_outputs(reference, images, latents)
    np.testing.assert_array_equal(ours[1], codes)
    diffs = max_abs_diff(ours[0], encoded), max_abs_diff(ours[2], decoded)
    print(f"VQModel {variant}: max abs diff latents {diffs[0]:.2e}, decoded {diffs[1]:.2e}")
    assert max(diffs) <= TOLERANCE


def test_exported_vq_model_loads_into_diffusers_unchanged(diffusers_vq, tmp_path):
    _, reference, imported = diffusers_vq
    scaling_factor = imported.extras["scaling_factor"]
    save_diffusers_vae(imported.module, imported.params, str(tmp_path), scaling_factor)
    reloaded = assert_loads_into_diffusers_unchanged(VQModel, tmp_path, reference)
    assert reloaded.config.scaling_factor == scaling_factor
    assert module_fields(vae_from_diffusers_config(dict(reloaded.config))) == (
        module_fields(imported.module)
    )
    images, latents = vae_inputs(imported.module)
    for ours, expected in zip(
        vq_outputs(reloaded, images, latents), vq_outputs(reference, images, latents), strict=True
    ):
        np.testing.assert_array_equal(ours, expected)


def test_kl_autoencoder_with_attention_levels_matches_diffusers():
    """Attention in the levels (CompVis kl-f16) is diffusers' Attn*Block2D, for KL too."""
    torch.manual_seed(0)
    reference = randomized(
        DiffusersAutoencoderKL(
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
            up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
            norm_num_groups=8,
        )
    )
    vae = vae_from_diffusers_config(dict(reference.config))
    assert vae.attention_levels == (False, True)
    assert vae_to_diffusers_config(vae, 0.18215)["up_block_types"] == list(
        reference.config.up_block_types
    )
    params = vae_params_from_state_dict(vae, state_dict_of(reference))
    images, latents = vae_inputs(vae)
    mean = vae.apply({"params": params}, images, method=vae.encode).mean
    decoded = vae.apply({"params": params}, latents, method=vae.decode)
    with torch.no_grad():
        expected_mean = reference.encode(torch.from_numpy(images.transpose(0, 3, 1, 2)))
        expected_decoded = reference.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2)))
    diffs = (
        max_abs_diff(mean, expected_mean.latent_dist.mean.numpy().transpose(0, 2, 3, 1)),
        max_abs_diff(decoded, expected_decoded.sample.numpy().transpose(0, 2, 3, 1)),
    )
    print(f"AutoencoderKL with level attention: max abs diff {diffs[0]:.2e}, {diffs[1]:.2e}")
    assert max(diffs) <= TOLERANCE


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key,value",
    [
        ("center_input_sample", True),
        ("time_embedding_type", "fourier"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("downsample_type", "resnet"),
        ("upsample_type", "resnet"),
        ("add_attention", False),
        ("attn_norm_num_groups", 4),
        ("class_embed_type", "timestep"),
        ("mid_block_type", None),
        ("mid_block_scale_factor", 1.414),
        ("act_fn", "gelu"),
        ("attention_head_dim", 12),
        ("time_embedding_dim", 100),
        ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D"]),
        ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]),
        ("layers_per_block", [1, 2]),
    ],
)
def test_unsupported_unet2d_options_raise_naming_the_key(key, value):
    unet = UNet(attention_levels=(False, True), attention_type="plain", **TINY)
    config = unet_to_diffusers_config(unet)
    with pytest.raises(ValueError, match=f"UNet2DModel config {re.escape(key)}="):
        unet_from_diffusers_config({**config, key: value})


@pytest.mark.parametrize(
    "key,value",
    [
        ("norm_type", "spatial"),
        ("vq_embed_dim", 8),
        ("lookup_from_codebook", True),
        ("act_fn", "relu"),
        ("down_block_types", ["DownEncoderBlock2D", "SimpleDownEncoderBlock2D"]),
        ("up_block_types", ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]),
    ],
)
def test_unsupported_vq_options_raise_naming_the_key(key, value):
    config = vae_to_diffusers_config(VQAutoencoder(block_out_channels=(8, 8)), 1.0)
    with pytest.raises(ValueError, match=f"VQModel config {re.escape(key)}="):
        vae_from_diffusers_config({**config, key: value})


def test_class_label_as_context_is_refused_with_the_reason(tmp_path):
    unet = UNet(
        attention_levels=(True, False),
        num_classes=3,
        class_conditioning="context",
        context_dim=16,
        **TINY,
    )
    with pytest.raises(ValueError, match="ClassEmbedder.*no diffusers U-Net.*single file"):
        unet_to_diffusers_config(unet)
    with pytest.raises(ValueError, match="ClassEmbedder"):
        save_diffusers_unet(unet, {}, str(tmp_path))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "fields,reason",
    [
        (dict(mid_block_attention=False), "mid block"),
        (dict(num_attention_heads=2), "one head width"),
    ],
)
def test_plain_unets_no_diffusers_class_computes_are_refused(fields, reason):
    unet = UNet(
        **{
            **TINY,
            "block_out_channels": (16, 32),
            "attention_levels": (True, True),
            "attention_type": "plain",
            **fields,
        }
    )
    with pytest.raises(ValueError, match=reason):
        unet_to_diffusers_config(unet)


def test_a_config_of_another_class_is_refused_naming_both():
    config = vae_to_diffusers_config(VQAutoencoder(), 1.0)
    with pytest.raises(ValueError, match="VQModel, not of a UNet2DConditionModel or UNet2DModel"):
        unet_from_diffusers_config(config)
    with pytest.raises(ValueError, match="UNet2DModel, not of a AutoencoderKL or VQModel"):
        vae_from_diffusers_config({"_class_name": "UNet2DModel"})
