"""The Flax CLIP model (both towers and projections) against transformers' CLIPModel, and
the CLIP score as torchmetrics defines it."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from tokenizers import pre_tokenizers

from ldm_jax.evaluate.clip_score import ClipScorer, clip_pixels, clip_scores
from ldm_jax.interop.clip import load_clip_model
from ldm_jax.models.clip_vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ldm_jax.parallel import mesh as mesh_lib
from ldm_jax.parallel import sharding

VOCAB = 2 * 256 + 2  # the byte-level test tokenizer's pieces
CONFIG = transformers.CLIPConfig(
    text_config=dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=VOCAB - 2,
        eos_token_id=VOCAB - 1,
        pad_token_id=VOCAB - 1,
    ),
    vision_config=dict(
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=30,
        patch_size=6,
    ),
    projection_dim=16,
)


def perturbed(model):
    """Random weights everywhere (transformers initialises biases to zero, norms to one)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def write_byte_level_tokenizer(directory):
    """CLIP tokenizer files with a byte-level vocabulary and no merges."""
    byte_pieces = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = [*byte_pieces, *(p + "</w>" for p in byte_pieces), "<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(pieces)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    model = perturbed(transformers.CLIPModel(CONFIG))
    model.save_pretrained(path)
    write_byte_level_tokenizer(path)
    return path, model


def test_embeddings_match_transformers(clip_dir):
    path, reference = clip_dir
    imported = load_clip_model(path)
    pixels = np.random.default_rng(0).normal(size=(3, 30, 30, 3)).astype(np.float32)
    token_ids = imported.extras["tokenizer"](["a red circle", "two", "a blue square!"])
    with torch.no_grad():
        vision = reference.vision_model(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        want_images = reference.visual_projection(vision.pooler_output).numpy()
        text = reference.text_model(torch.from_numpy(np.asarray(token_ids)).long())
        want_text = reference.text_projection(text.pooler_output).numpy()
    got_images, got_text = jax.jit(imported.module.apply)(
        {"params": imported.params}, pixels, token_ids
    )
    image_error = np.abs(np.asarray(got_images) - want_images).max()
    text_error = np.abs(np.asarray(got_text) - want_text).max()
    print(f"max |flax - torch|: image embeddings {image_error:.1e}, text {text_error:.1e}")
    np.testing.assert_allclose(got_images, want_images, atol=1e-4)
    np.testing.assert_allclose(got_text, want_text, atol=1e-4)


def test_clip_score_is_100_cosine_clipped_at_zero():
    images = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    texts = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    np.testing.assert_allclose(
        clip_scores(images, texts), [100.0, 100 / np.sqrt(2), 0.0], atol=1e-4
    )


def test_pixels_are_resized_cropped_and_normalised():
    images = np.full((1, 20, 10, 3), 255, np.uint8)
    pixels = np.asarray(clip_pixels(images, 30, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    assert pixels.shape == (1, 30, 30, 3)
    want = (1.0 - np.asarray(OPENAI_CLIP_MEAN)) / np.asarray(OPENAI_CLIP_STD)
    np.testing.assert_allclose(pixels[0, 0, 0], want, atol=1e-5)


def test_scorer_on_the_mesh_matches_the_model(clip_dir):
    path, reference = clip_dir
    mesh = mesh_lib.create_mesh(data=-1)
    scorer = ClipScorer(str(path), mesh)
    images = np.random.default_rng(1).integers(0, 256, (8, 30, 30, 3), dtype=np.uint8)
    prompts = [f"prompt {i}" for i in range(8)]
    tokens = scorer.tokens(prompts)
    batch = sharding.batch_sharding(mesh)
    scores = sharding.to_host(scorer(jax.device_put(images, batch), jax.device_put(tokens, batch)))
    pixels = clip_pixels(images, 30, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    with torch.no_grad():
        image_embeds = reference.visual_projection(
            reference.vision_model(
                torch.from_numpy(np.asarray(pixels)).permute(0, 3, 1, 2)
            ).pooler_output
        )
        text_embeds = reference.text_projection(
            reference.text_model(torch.from_numpy(tokens).long()).pooler_output
        )
        cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds).numpy()
    np.testing.assert_allclose(scores, np.maximum(100 * cosine, 0), atol=1e-3)
