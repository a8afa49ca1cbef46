"""The CLIP score of images and their prompts: ``max(100 cos(E_image, E_text), 0)``.

As torchmetrics' ``CLIPScore``: each image and its caption are embedded by a CLIP model
(transformers' ``CLIPModel`` weights, read from a local directory), the score is 100 times
the cosine of the two embeddings, clipped at 0, averaged over the images. Images are
prepared as transformers' ``CLIPImageProcessor`` does: the shorter side resized to the
vision tower's size (bicubic), a centre crop, and the processor's RGB normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ldm_jax.interop.clip import load_clip_model
from ldm_jax.parallel import sharding

SCORE_SCALE = 100.0


def clip_pixels(
    images: jax.Array, size: int, mean: Sequence[float], std: Sequence[float]
) -> jax.Array:
    """uint8 (B, H, W, 3) to normalised float (B, size, size, 3): resize, crop, normalise."""
    batch, height, width, channels = images.shape
    scale = size / min(height, width)
    resized_h, resized_w = max(size, round(height * scale)), max(size, round(width * scale))
    pixels = jax.image.resize(
        images.astype(jnp.float32) / 255.0, (batch, resized_h, resized_w, channels), "bicubic"
    )
    top, left = (resized_h - size) // 2, (resized_w - size) // 2
    pixels = jnp.clip(pixels[:, top : top + size, left : left + size], 0.0, 1.0)
    return (pixels - jnp.asarray(mean)) / jnp.asarray(std)


def clip_scores(image_embeddings: jax.Array, text_embeddings: jax.Array) -> jax.Array:
    """Per pair ``max(100 cos, 0)``, the embeddings (B, D) not yet unit-normalised."""

    def unit(x: jax.Array) -> jax.Array:
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    cosine = jnp.sum(unit(image_embeddings) * unit(text_embeddings), axis=-1)
    return jnp.maximum(SCORE_SCALE * cosine, 0.0)


class ClipScorer:
    """``scorer(images, token_ids)``: per-image CLIP scores of global batches on the mesh."""

    def __init__(self, weights_dir: str, mesh: Mesh):
        imported = load_clip_model(weights_dir)
        model, self.tokenizer, self.mesh = imported.module, imported.extras["tokenizer"], mesh
        self.params = jax.device_put(imported.params, sharding.replicated(mesh))
        size, mean, std = (
            model.vision_model.image_size,
            imported.extras["image_mean"],
            imported.extras["image_std"],
        )

        def score(params, images, token_ids):
            image_embeddings, text_embeddings = model.apply(
                {"params": params}, clip_pixels(images, size, mean, std), token_ids
            )
            return clip_scores(image_embeddings, text_embeddings)

        batch = sharding.batch_sharding(mesh)
        self._score = jax.jit(
            score, in_shardings=(sharding.replicated(mesh), batch, batch), out_shardings=batch
        )

    def tokens(self, prompts: Sequence[str]) -> np.ndarray:
        """The (N, L) int32 token ids of the prompts, for this CLIP's text tower."""
        return np.asarray(self.tokenizer(list(prompts)), np.int32)

    def __call__(self, images: jax.Array, token_ids: jax.Array) -> jax.Array:
        with jax.set_mesh(self.mesh):
            return self._score(self.params, images, token_ids)
