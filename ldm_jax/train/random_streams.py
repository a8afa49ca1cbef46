"""The random streams of training, one named number each.

Every random draw of a run comes from ``config.seed``: a stage's parameter initialisation
(``state.init_key(seed, stream, ...)``), its per-step draws (``step_key``: folded with the
step inside the step), and the shuffling of its data (``data_seed``). Each use has its own
stream, so no two draw the same numbers, and changing one (a new data order) leaves the
others as they were.
"""

from __future__ import annotations

import jax

AUTOENCODER_INIT = 1
AUTOENCODER_DATA = 1
AUTOENCODER_STEPS = 2
# The batches and posterior samples that measure the latent scale of a trained autoencoder.
LATENT_SCALE = 3
DIFFUSION_INIT = 11
DIFFUSION_DATA = 11
DIFFUSION_STEPS = 12
FINETUNE_INIT = 21
FINETUNE_DATA = 21
FINETUNE_STEPS = 22


def step_key(seed: int, stream: int) -> jax.Array:
    """The root key of a stage's per-step draws (each step folds in its step number)."""
    return jax.random.fold_in(jax.random.key(seed), stream)


def data_seed(seed: int, stream: int) -> int:
    """The seed of a data pipeline's shuffling."""
    return seed + stream
