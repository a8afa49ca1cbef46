"""CLIP text encoders in and out of transformers' directory format."""

import functools
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from tokenizers import pre_tokenizers

from ldm_jax.interop.clip import load_clip_text_encoder, save_clip_text_encoder
from ldm_jax.interop.convert import WeightsMismatchError
from ldm_jax.models.clip import pooled_output

VOCAB_SIZE, MAX_LENGTH, WIDTH = 1000, 77, 32
TEXT_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=WIDTH,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    bos_token_id=VOCAB_SIZE - 2,
    eos_token_id=VOCAB_SIZE - 1,
    pad_token_id=VOCAB_SIZE - 1,
)
TOKEN_IDS = np.random.default_rng(0).integers(0, VOCAB_SIZE - 1, (2, MAX_LENGTH)).astype(np.int32)
TOKEN_IDS[:, 40] = VOCAB_SIZE - 1


@functools.partial(jax.jit, static_argnums=0)
def encode(module, params, token_ids):
    return module.apply({"params": params}, token_ids)


def perturbed(model):
    """Random weights everywhere (transformers initialises biases to zero, norms to one)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def torch_text_outputs(model):
    with torch.no_grad():
        return model(torch.from_numpy(TOKEN_IDS).long())


def write_byte_level_tokenizer(directory):
    """CLIP tokenizer files with a byte-level vocabulary and no merges."""
    byte_pieces = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = [*byte_pieces, *(p + "</w>" for p in byte_pieces), "<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(pieces)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")


@pytest.fixture(scope="module")
def stable_diffusion_layout(tmp_path_factory):
    """`text_encoder/` and a sibling `tokenizer/`, as in a Stable Diffusion pipeline."""
    root = tmp_path_factory.mktemp("pipeline")
    model = perturbed(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_CONFIG)))
    model.save_pretrained(root / "text_encoder")
    write_byte_level_tokenizer(root / "tokenizer")
    return root, model


def test_round_trip_through_transformers(stable_diffusion_layout, tmp_path):
    root, model = stable_diffusion_layout
    imported = load_clip_text_encoder(root / "text_encoder")
    assert imported.extras["tokenizer"] is not None
    assert imported.extras["config"]["eos_token_id"] == VOCAB_SIZE - 1
    save_clip_text_encoder(
        imported.module,
        imported.params,
        tmp_path,
        tokenizer_dir=imported.extras["tokenizer_dir"],
        config=imported.extras["config"],
    )
    reloaded = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    want, got = torch_text_outputs(model), torch_text_outputs(reloaded)
    np.testing.assert_array_equal(got.last_hidden_state.numpy(), want.last_hidden_state.numpy())
    np.testing.assert_array_equal(got.pooler_output.numpy(), want.pooler_output.numpy())
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    want_ids = tokenizer(["a cat!"], padding="max_length", max_length=MAX_LENGTH)["input_ids"]
    np.testing.assert_array_equal(imported.extras["tokenizer"](["a cat!"]), want_ids)
    # The written directory imports again, to the same model.
    again = load_clip_text_encoder(tmp_path)
    assert again.module == imported.module
    hidden = encode(again.module, again.params, TOKEN_IDS)
    np.testing.assert_allclose(np.asarray(hidden), want.last_hidden_state.numpy(), atol=1e-4)


@pytest.mark.parametrize("architecture", ["CLIPTextModelWithProjection", "CLIPModel"])
def test_text_part_of_models_with_projection_or_vision_tower(architecture, tmp_path):
    if architecture == "CLIPModel":
        vision = dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=16,
        )
        config = transformers.CLIPConfig(
            text_config=TEXT_CONFIG, vision_config=vision, projection_dim=16
        )
        model = perturbed(transformers.CLIPModel(config))
        text_model = model.text_model
    else:
        config = transformers.CLIPTextConfig(**TEXT_CONFIG, projection_dim=16)
        model = perturbed(transformers.CLIPTextModelWithProjection(config))
        text_model = model.text_model
    model.save_pretrained(tmp_path)
    imported = load_clip_text_encoder(tmp_path)
    assert imported.extras["tokenizer"] is None
    want = torch_text_outputs(text_model)
    hidden = encode(imported.module, imported.params, TOKEN_IDS)
    np.testing.assert_allclose(np.asarray(hidden), want.last_hidden_state.numpy(), atol=1e-4)
    pooled = pooled_output(hidden, TOKEN_IDS, imported.extras["config"]["eos_token_id"])
    np.testing.assert_allclose(np.asarray(pooled), want.pooler_output.numpy(), atol=1e-4)


def edited_copy(source, destination, **config_changes):
    for name in ("config.json", "model.safetensors"):
        (destination / name).write_bytes((source / name).read_bytes())
    config = json.loads((source / "config.json").read_text())
    (destination / "config.json").write_text(json.dumps({**config, **config_changes}))
    return destination


def test_config_that_does_not_fit_the_weights_names_the_tensor_and_shapes(
    stable_diffusion_layout, tmp_path
):
    root, _ = stable_diffusion_layout
    path = edited_copy(root / "text_encoder", tmp_path, intermediate_size=40)
    with pytest.raises(WeightsMismatchError, match=r"mlp\.fc[12]\.(weight|bias)") as error:
        load_clip_text_encoder(path)
    assert "37" in str(error.value) and "40" in str(error.value)


@pytest.mark.parametrize(
    "changes,key", [({"hidden_act": "relu"}, "hidden_act"), ({"model_type": "bert"}, "model_type")]
)
def test_unsupported_config_values_are_named(stable_diffusion_layout, tmp_path, changes, key):
    root, _ = stable_diffusion_layout
    path = edited_copy(root / "text_encoder", tmp_path, **changes)
    with pytest.raises(ValueError, match=key):
        load_clip_text_encoder(path)


def test_missing_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_clip_text_encoder(tmp_path)
