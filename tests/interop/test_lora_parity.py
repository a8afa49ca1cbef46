"""LoRA files against diffusers and peft, on tiny random models: a LoRA made there computes
the same here, and ours (saved in either layout) computes the same there."""

import copy
import types

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict

from ldm_jax.interop.clip import load_clip_text_encoder
from ldm_jax.interop.diffusers import load_diffusers_unet
from ldm_jax.interop.lora import LoraWeights, check_lora, load_lora, save_lora
from ldm_jax.interop.safetensors_io import read_safetensors
from ldm_jax.models import lora
from tests.interop.test_clip_interop import TEXT_CONFIG, TOKEN_IDS, perturbed
from tests.interop.test_diffusers import (
    SIZE,
    UNET_VARIANTS,
    diffusers_unet_output,
    randomized,
    unet_inputs,
)

TOLERANCE = 1e-4
RANK, ALPHA = 4, 8.0
# peft's names of the modules adapted: the attention projections, and convolutions too
# (the spatial transformers' 1x1 `proj_in`, the resnets' 3x3 `conv1`).
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The base PyTorch models, their imports here, and one jitted forward of each."""
    root = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    torch_unet = randomized(UNet2DConditionModel(sample_size=SIZE, **UNET_VARIANTS["sd1"]))
    torch_unet.save_pretrained(root / "unet")
    config = transformers.CLIPTextConfig(**TEXT_CONFIG)
    torch_text_encoder = perturbed(transformers.CLIPTextModel(config))
    torch_text_encoder.save_pretrained(root / "text_encoder")
    unet = load_diffusers_unet(str(root / "unet"))
    text_encoder = load_clip_text_encoder(root / "text_encoder")
    return types.SimpleNamespace(
        torch_unet=torch_unet,
        torch_text_encoder=torch_text_encoder,
        unet=unet,
        text_encoder=text_encoder,
        unet_inputs=unet_inputs(unet.module),
        apply_unet=jax.jit(unet.module.apply),
        apply_text_encoder=jax.jit(text_encoder.module.apply),
    )


def torch_outputs(unet, text_encoder, inputs) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' ε (NHWC) and the text encoder's last hidden states."""
    with torch.no_grad():
        hidden = text_encoder(torch.from_numpy(TOKEN_IDS).long()).last_hidden_state.numpy()
    return diffusers_unet_output(unet, *inputs), hidden


def our_outputs(models, weights: LoraWeights) -> tuple[np.ndarray, np.ndarray]:
    check_lora(weights, models.unet.params, models.text_encoder.params)
    unet_params = lora.adapted(models.unet.params, [(weights.unet, weights.scale)])
    text_params = lora.adapted(models.text_encoder.params, [(weights.text_encoder, weights.scale)])
    epsilon = models.apply_unet({"params": unet_params}, *models.unet_inputs)
    hidden = models.apply_text_encoder({"params": text_params}, TOKEN_IDS)
    return np.asarray(epsilon), np.asarray(hidden)


def diffusers_outputs_with(models, lora_file) -> tuple[np.ndarray, np.ndarray]:
    """The outputs of a Stable Diffusion pipeline of the base models after
    `load_lora_weights(lora_file)`."""
    pipeline = StableDiffusionPipeline(
        vae=DiffusersAutoencoderKL(block_out_channels=(8,), norm_num_groups=8),
        text_encoder=copy.deepcopy(models.torch_text_encoder),
        tokenizer=None,
        unet=copy.deepcopy(models.torch_unet),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.load_lora_weights(str(lora_file))
    return torch_outputs(pipeline.unet, pipeline.text_encoder, models.unet_inputs)


def assert_close(ours, reference, what: str) -> None:
    for name, got, want in zip(("U-Net ε", "text hidden states"), ours, reference, strict=True):
        diff = float(np.max(np.abs(got - want)))
        print(f"{what}, {name}: max abs diff {diff:.2e}")
        assert diff <= TOLERANCE, (what, name, diff)


def _randomize_lora_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-zero `lora_B` (peft starts it at zero, which would test nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def peft_lora(models, tmp_path_factory):
    """A LoRA made with peft on the PyTorch models, saved by diffusers' `save_lora_weights`
    with the metadata its training scripts write; and the outputs of the adapted models."""
    unet = copy.deepcopy(models.torch_unet)
    text_encoder = copy.deepcopy(models.torch_text_encoder)
    for model, targets, seed in ((unet, UNET_TARGETS, 1), (text_encoder, TEXT_TARGETS, 2)):
        config = peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=targets
        )
        model.add_adapter(config)
        _randomize_lora_weights(model, seed)
    directory = tmp_path_factory.mktemp("peft_lora")
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text_encoder),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text_encoder.peft_config["default"].to_dict(),
    )
    base = torch_outputs(models.torch_unet, models.torch_text_encoder, models.unet_inputs)
    adapted = torch_outputs(unet, text_encoder, models.unet_inputs)
    # The LoRA changes both outputs far beyond the tolerance, so matching them tests it.
    assert all(np.max(np.abs(a - b)) > 100 * TOLERANCE for a, b in zip(adapted, base, strict=True))
    return types.SimpleNamespace(
        directory=directory, unet=unet, text_encoder=text_encoder, outputs=adapted
    )


def test_lora_made_with_peft_computes_as_in_diffusers(models, peft_lora):
    weights = load_lora(peft_lora.directory)
    assert (weights.rank, weights.alpha) == (RANK, ALPHA)
    conv1 = weights.unet["down_blocks_0"]["resnets_0"]["conv1"]
    assert conv1["lora_down"].shape == (3, 3, 16, RANK) and conv1["lora_up"].shape == (RANK, 16)
    assert_close(our_outputs(models, weights), peft_lora.outputs, "peft LoRA")


def test_lora_in_diffusers_training_script_names_without_metadata(models, peft_lora, tmp_path):
    """diffusers' training scripts convert peft's names (`to_q.lora.down.weight`,
    `q_proj.lora_linear_layer.down.weight`); without metadata diffusers takes scale 1.

    Only the attention adapters: diffusers converts these names back only when a file's
    first key has them, and the convolutions' keep peft's names (`proj_in.lora_A.weight`).
    """
    unet_layers = get_peft_model_state_dict(peft_lora.unet)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=convert_state_dict_to_diffusers(
            {name: value for name, value in unet_layers.items() if ".attn" in name}
        ),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(
            get_peft_model_state_dict(peft_lora.text_encoder)
        ),
    )
    names = list(read_safetensors(tmp_path / "pytorch_lora_weights.safetensors"))
    assert any(name.endswith("to_q.lora.down.weight") for name in names)
    assert any(name.endswith("q_proj.lora_linear_layer.down.weight") for name in names)
    weights = load_lora(tmp_path)
    assert weights.scale == 1.0
    assert_close(
        our_outputs(models, weights), diffusers_outputs_with(models, tmp_path), "diffusers names"
    )


def test_kohya_export_loads_into_diffusers_and_back(models, peft_lora, tmp_path):
    weights = load_lora(peft_lora.directory)
    path = tmp_path / "kohya.safetensors"
    save_lora(path, weights, format="kohya")
    assert_close(diffusers_outputs_with(models, path), peft_lora.outputs, "kohya in diffusers")
    again = load_lora(path)
    assert (again.rank, again.alpha) == (weights.rank, weights.alpha)
    jax.tree.map(np.testing.assert_array_equal, again.components(), weights.components())


def test_lora_made_here_loads_into_diffusers(models, tmp_path):
    """Attention adapters of rank 4 and convolution adapters of rank 2, one scale: diffusers
    reads the per-module ranks and alphas from the metadata."""
    key = jax.random.key(0)
    attention = lora.LoraShape(rank=RANK, alpha=ALPHA)
    convolutions = lora.LoraShape(
        rank=2, alpha=ALPHA, targets=lora.expand_targets(["convolutions", "projections"])
    )
    unet = _randomized_up(
        _merged_trees(
            lora.init_adapters(key, models.unet.params, attention),
            lora.init_adapters(jax.random.fold_in(key, 1), models.unet.params, convolutions),
        ),
        seed=2,
    )
    text_encoder = _randomized_up(
        lora.init_adapters(jax.random.fold_in(key, 3), models.text_encoder.params, attention),
        seed=4,
    )
    weights = LoraWeights(unet=unet, text_encoder=text_encoder, rank=RANK, alpha=ALPHA)
    path = tmp_path / "ours.safetensors"
    save_lora(path, weights)
    assert_close(our_outputs(models, weights), diffusers_outputs_with(models, path), "our LoRA")


def _merged_trees(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merged_trees(out[key], value) if key in out else value
    return out


def _randomized_up(adapters: dict, seed: int) -> dict:
    """Non-zero `lora_up` (`init_adapters` starts it at zero, as peft does)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map_with_path(
        lambda path, leaf: (
            (0.2 * rng.normal(size=leaf.shape)).astype(np.float32)
            if path[-1].key == lora.UP
            else leaf
        ),
        adapters,
    )


def test_merge_then_unmerge_restores_the_base_params_bitwise(models, peft_lora):
    weights = load_lora(peft_lora.directory)
    loras = [(weights.unet, weights.scale)]
    merged, originals = lora.merge(models.unet.params, loras)
    epsilon = models.apply_unet({"params": merged}, *models.unet_inputs)
    assert float(np.max(np.abs(epsilon - peft_lora.outputs[0]))) <= TOLERANCE
    restored = lora.unmerge(merged, originals)
    jax.tree.map(
        lambda got, want: np.testing.assert_array_equal(
            np.asarray(got).view(np.uint32), np.asarray(want).view(np.uint32)
        ),
        restored,
        models.unet.params,
    )
