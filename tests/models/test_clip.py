"""CLIP's text transformer against transformers' PyTorch `CLIPTextModel`."""

import functools

import flax
import jax
import numpy as np
import pytest
import torch
import transformers

from ldm_jax.interop.clip import load_clip_text_encoder
from ldm_jax.models.clip import CLIPTextTransformer, pooled_output

# rbg keys compile far faster than threefry on CPU, and compiling dominates these tests.
KEY = jax.random.key(0, impl="rbg")
VOCAB_SIZE, MAX_LENGTH, WIDTH, NUM_LAYERS = 1000, 77, 32, 2
BOS, EOS = VOCAB_SIZE - 2, VOCAB_SIZE - 1


def tiny_config(hidden_act: str) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=WIDTH,
        intermediate_size=37,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act=hidden_act,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )


@functools.partial(jax.jit, static_argnums=0)
def encode(module, params, token_ids):
    return module.apply({"params": params}, token_ids)


def prompt_ids() -> np.ndarray:
    """Two prompts as a tokenizer makes them: bos, words, eos; the first padded with eos."""
    ids = np.random.default_rng(0).integers(0, BOS, size=(2, MAX_LENGTH))
    ids[:, 0] = BOS
    ids[0, 5:] = EOS
    ids[1, [20, 40]] = EOS
    return ids.astype(np.int32)


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def reference(request, tmp_path_factory):
    """A random transformers model (biases and norms perturbed too) and its import."""
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(tiny_config(request.param)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, load_clip_text_encoder(path)


def torch_outputs(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(ids).long(), output_hidden_states=True)


def test_last_hidden_state_and_pooled_output_match_transformers(reference):
    model, imported = reference
    ids = prompt_ids()
    want = torch_outputs(model, ids)
    hidden = encode(imported.module, imported.params, ids)
    np.testing.assert_allclose(np.asarray(hidden), want.last_hidden_state.numpy(), atol=1e-4)
    pooled = pooled_output(hidden, ids, imported.extras["config"]["eos_token_id"])
    np.testing.assert_allclose(np.asarray(pooled), want.pooler_output.numpy(), atol=1e-4)


def test_pooled_output_of_legacy_eos_token_id_is_at_the_largest_id(reference):
    model, imported = reference
    ids = prompt_ids()
    ids = np.where(ids >= BOS, 7, ids)
    ids[0, 9] = ids[1, 3] = BOS - 1
    model.eos_token_id = 2  # what configs said before transformers fixed it
    try:
        want = torch_outputs(model, ids).pooler_output.numpy()
    finally:
        model.eos_token_id = EOS
    pooled = pooled_output(encode(imported.module, imported.params, ids), ids, 2)
    np.testing.assert_allclose(np.asarray(pooled), want, atol=1e-4)


def test_skip_last_layers_is_an_earlier_layer_through_the_final_layer_norm(reference):
    model, imported = reference
    ids = prompt_ids()
    with torch.no_grad():
        penultimate = torch_outputs(model, ids).hidden_states[-2]
        want = model.final_layer_norm(penultimate).numpy()
    skipping = imported.module.clone(skip_last_layers=1)
    got = encode(skipping, imported.params, ids)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_attention_is_causal(reference):
    _, imported = reference
    ids = prompt_ids()
    changed = ids.copy()
    changed[:, 30] = 123
    before = np.asarray(encode(imported.module, imported.params, ids))
    after = np.asarray(encode(imported.module, imported.params, changed))
    np.testing.assert_allclose(before[:, :30], after[:, :30], atol=1e-6)
    assert np.abs(before[:, 30:] - after[:, 30:]).max() > 1e-3


def test_parameter_tree_mirrors_transformers_text_model():
    module = CLIPTextTransformer(
        vocab_size=VOCAB_SIZE, width=WIDTH, num_layers=NUM_LAYERS, num_heads=4, mlp_width=37
    )
    ids = np.zeros((1, MAX_LENGTH), np.int32)
    # Whatever the cut, initialisation creates every layer: one checkpoint serves all.
    params = jax.eval_shape(module.clone(skip_last_layers=1).init, KEY, ids)["params"]
    paths = {
        "/".join(path) for path in flax.traverse_util.flatten_dict(flax.linen.meta.unbox(params))
    }
    assert "embeddings/token_embedding/embedding" in paths
    assert "embeddings/position_embedding/embedding" in paths
    assert "final_layer_norm/scale" in paths
    for i in range(NUM_LAYERS):
        layer = f"encoder/layers_{i}"
        for name in ("to_q", "to_k", "to_v", "to_out_0"):
            assert f"{layer}/self_attn/{name}/bias" in paths
        for name in ("layer_norm1/scale", "layer_norm2/bias", "mlp/fc1/kernel", "mlp/fc2/bias"):
            assert f"{layer}/{name}" in paths


@pytest.mark.parametrize(
    "fields,shape,message",
    [
        ({}, (1, MAX_LENGTH + 1), "max_length=77"),
        ({"skip_last_layers": NUM_LAYERS}, (1, 4), "skip_last_layers"),
        ({"activation": "relu"}, (1, 4), "activation"),
    ],
)
def test_bad_inputs_and_fields_raise_a_clear_error(fields, shape, message):
    module = CLIPTextTransformer(
        vocab_size=VOCAB_SIZE, width=WIDTH, num_layers=NUM_LAYERS, num_heads=4, **fields
    )
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(module.init, KEY, np.zeros(shape, np.int32))
