"""CompVis LDM single files: plain qkv attention U-Nets, VQ first stages, class embedders.

The references are diffusers' PyTorch `UNet2DModel`, `VQModel` and `UNet2DConditionModel`
on tiny random configs, and, for the fused `qkv` layout, CompVis' attention block written
out below in PyTorch (`QKVAttentionLegacy`'s head-by-head q, k, v order).
"""

import json

import jax
import numpy as np
import torch
from diffusers import UNet2DConditionModel, UNet2DModel, VQModel

from ldm_jax.interop.convert import ImportedModel
from ldm_jax.interop.diffusers import (
    unet_from_diffusers_config,
    unet_params_from_state_dict,
    vae_from_diffusers_config,
    vae_params_from_state_dict,
)
from ldm_jax.interop.safetensors_io import read_safetensors
from ldm_jax.interop.single_file import load_single_file, save_single_file
from ldm_jax.models import VQAutoencoder
from tests.conftest import run_cli
from tests.interop.test_diffusers import randomized

TOLERANCE = 1e-4
BATCH, LATENT_SIZE, IMAGE_SIZE, HEAD_WIDTH = 2, 8, 16, 16
PLAIN_UNET = dict(
    sample_size=LATENT_SIZE,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=HEAD_WIDTH,  # UNet2DModel: the width of a head
)
VQ = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=3,
    num_vq_embeddings=16,
    down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
    up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
)
CLASS_UNET = dict(
    sample_size=LATENT_SIZE,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=(1, 2),  # UNet2DConditionModel: heads; 32 channels each, as CompVis
)
NUM_CLASSES = 4


def imported(model: torch.nn.Module, from_config, params_from_state_dict) -> ImportedModel:
    module = from_config({"_class_name": type(model).__name__, **model.config})
    state_dict = {name: value.numpy().copy() for name, value in model.state_dict().items()}
    return ImportedModel(module, params_from_state_dict(module, state_dict))


def unet_output(unet: ImportedModel, latents, timesteps, context=None, labels=None):
    return jax.jit(unet.module.apply)({"params": unet.params}, latents, timesteps, context, labels)


def nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.transpose(0, 3, 1, 2).copy())


def compvis_attention_block(x: torch.Tensor, tensors: dict, prefix: str, heads: int):
    """CompVis' `AttentionBlock` (legacy head order) on `(B, C, T)` features."""
    norm = torch.nn.functional.group_norm(
        x, 32, torch.from_numpy(tensors[f"{prefix}.norm.weight"]),
        torch.from_numpy(tensors[f"{prefix}.norm.bias"]),
    )  # fmt: skip
    qkv = torch.nn.functional.conv1d(
        norm, torch.from_numpy(tensors[f"{prefix}.qkv.weight"]),
        torch.from_numpy(tensors[f"{prefix}.qkv.bias"]),
    )  # fmt: skip
    batch, width, length = qkv.shape
    q, k, v = qkv.reshape(batch * heads, width // heads, length).split(width // (3 * heads), 1)
    scale = (width // (3 * heads)) ** -0.25
    weights = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    attended = torch.einsum("bts,bcs->bct", weights, v).reshape(batch, -1, length)
    out = torch.nn.functional.conv1d(
        attended, torch.from_numpy(tensors[f"{prefix}.proj_out.weight"]),
        torch.from_numpy(tensors[f"{prefix}.proj_out.bias"]),
    )  # fmt: skip
    return x + out


def test_fused_qkv_is_ordered_head_by_head_as_compvis_attends(tmp_path):
    model = randomized(UNet2DModel(**PLAIN_UNET))
    path = tmp_path / "plain.safetensors"
    save_single_file(
        path, unet=imported(model, unet_from_diffusers_config, unet_params_from_state_dict)
    )
    tensors = read_safetensors(str(path))
    prefix = "model.diffusion_model.input_blocks.3.1"  # down_blocks.1.attentions.0
    assert tensors[f"{prefix}.qkv.weight"].shape == (3 * 64, 64, 1)
    assert tensors[f"{prefix}.proj_out.weight"].shape == (64, 64, 1)
    features = torch.randn(BATCH, 64, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.down_blocks[1].attentions[0](features).numpy()
        heads = 64 // HEAD_WIDTH
        actual = compvis_attention_block(features.reshape(BATCH, 64, 16), tensors, prefix, heads)
    np.testing.assert_allclose(actual.reshape(expected.shape).numpy(), expected, atol=1e-5)


def test_unconditional_ldm_file_round_trip(tmp_path):
    """A plain-attention U-Net and a VQ autoencoder (with per-level attention) through one
    CompVis-named file give diffusers' UNet2DModel and VQModel outputs."""
    unet_model = randomized(UNet2DModel(**PLAIN_UNET))
    vq_model = randomized(VQModel(**VQ), seed=1)
    path = tmp_path / "ldm.safetensors"
    save_single_file(
        path,
        unet=imported(unet_model, unet_from_diffusers_config, unet_params_from_state_dict),
        vae=imported(vq_model, vae_from_diffusers_config, vae_params_from_state_dict),
    )
    names = set(read_safetensors(str(path)))
    assert "first_stage_model.quantize.embedding.weight" in names
    assert "first_stage_model.encoder.down.1.attn.0.q.weight" in names
    assert "first_stage_model.decoder.up.1.attn.1.proj_out.weight" in names

    loaded = load_single_file(path, head_width=HEAD_WIDTH)
    unet, vae = loaded["unet"], loaded["vae"]
    assert unet.module.attention_type == "plain" and unet.module.heads_per_level == (2, 4)
    assert isinstance(vae.module, VQAutoencoder) and vae.module.num_embeddings == 16
    assert vae.module.attention_levels == (False, True)
    assert vae.extras["scaling_factor"] == 1.0  # CompVis' VQ LDMs do not rescale latents

    rng = np.random.default_rng(0)
    latents = rng.normal(size=(BATCH, LATENT_SIZE, LATENT_SIZE, 3)).astype(np.float32)
    timesteps = np.array([3, 800])
    images = rng.uniform(-1, 1, size=(BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        expected = unet_model(nchw(latents), torch.from_numpy(timesteps)).sample.numpy()
        encoded = vq_model.encode(nchw(images)).latents
        decoded = vq_model.decode(encoded).sample.numpy()
    np.testing.assert_allclose(
        unet_output(unet, latents, timesteps), expected.transpose(0, 2, 3, 1), atol=TOLERANCE
    )
    module = vae.module
    mean = module.apply({"params": vae.params}, images, method=module.encode).mean
    np.testing.assert_allclose(mean, encoded.numpy().transpose(0, 2, 3, 1), atol=TOLERANCE)
    out = module.apply({"params": vae.params}, np.asarray(mean), method=module.decode)
    np.testing.assert_allclose(out, decoded.transpose(0, 2, 3, 1), atol=TOLERANCE)


def test_class_embedder_is_the_cross_attention_token(tmp_path):
    """CompVis' ImageNet LDM layout: `cond_stage_model.embedding` conditions the transformers."""
    model = randomized(UNet2DConditionModel(**CLASS_UNET), seed=2)
    base = imported(model, unet_from_diffusers_config, unet_params_from_state_dict)
    table = np.random.default_rng(1).normal(size=(NUM_CLASSES + 1, 16)).astype(np.float32)
    module = base.module.clone(num_classes=NUM_CLASSES, class_conditioning="context")
    params = {**base.params, "class_embedding": {"embedding": table}}
    path = tmp_path / "cin.safetensors"
    save_single_file(path, unet=ImportedModel(module, params))
    tensors = read_safetensors(str(path))
    np.testing.assert_array_equal(tensors["cond_stage_model.embedding.weight"], table)
    assert not any("label_emb" in name for name in tensors)

    unet = load_single_file(path)["unet"]  # heads of 32 channels: CompVis' default
    assert unet.module.class_conditioning == "context"
    assert unet.module.num_classes == NUM_CLASSES and unet.module.heads_per_level == (1, 2)
    rng = np.random.default_rng(2)
    latents = rng.normal(size=(BATCH, LATENT_SIZE, LATENT_SIZE, 4)).astype(np.float32)
    timesteps, labels = np.array([3, 800]), np.array([1, NUM_CLASSES])
    with torch.no_grad():
        expected = model(
            nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(table[labels][:, None])
        ).sample.numpy()
    actual = unet_output(unet, latents, timesteps, labels=labels)
    np.testing.assert_allclose(actual, expected.transpose(0, 2, 3, 1), atol=TOLERANCE)


def test_class_conditional_ldm_file_imports_samples_and_exports(tmp_path):
    """No diffusers pipeline computes as a class-as-context LDM: its workdir keeps the single
    file, samples from it by label, and exports the same tensors back."""
    unet_model = randomized(UNet2DConditionModel(**CLASS_UNET), seed=2)
    vq_model = randomized(VQModel(**{**VQ, "latent_channels": 4}), seed=1)
    base = imported(unet_model, unet_from_diffusers_config, unet_params_from_state_dict)
    table = np.random.default_rng(1).normal(size=(NUM_CLASSES + 1, 16)).astype(np.float32)
    unet = ImportedModel(
        base.module.clone(num_classes=NUM_CLASSES, class_conditioning="context"),
        {**base.params, "class_embedding": {"embedding": table}},
    )
    vae = imported(vq_model, vae_from_diffusers_config, vae_params_from_state_dict)
    source = tmp_path / "cin.safetensors"
    save_single_file(source, unet=unet, vae=vae)

    workdir = tmp_path / "run"
    result = run_cli("import", "--from=single-file", str(source), f"--workdir={workdir}",
                     "--image_size=16")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "--label=N" in result.stdout and (workdir / "model.safetensors").is_file()
    config = json.loads((workdir / "config.json").read_text())
    assert config["diffusion"]["conditioning"] == "class"
    assert config["diffusion"]["unet"]["class_context_dim"] == 16
    assert config["data"]["num_classes"] == NUM_CLASSES

    grid = tmp_path / "grid.png"
    result = run_cli(
        "sample", f"--workdir={workdir}", "--label=1", "--num_per_prompt=2", "--steps=2",
        f"--out={grid}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert grid.is_file()

    exported = tmp_path / "exported.safetensors"
    result = run_cli("export", f"--workdir={workdir}", "--to=safetensors", f"--out={exported}")
    assert result.returncode == 0, result.stderr
    expected, actual = read_safetensors(str(source)), read_safetensors(str(exported))
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)
