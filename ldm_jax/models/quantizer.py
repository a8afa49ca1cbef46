"""Vector quantisation of latents (VQ-VAE, van den Oord et al. 2017) for the VQ autoencoder.

Each latent vector is replaced by its nearest codebook entry; gradients pass straight
through to the encoder. The codebook is either a gradient-trained parameter (with the
codebook loss) or an exponential moving average of the vectors assigned to each code
(VQ-VAE-2, sonnet's `VectorQuantizerEMA`), kept in the mutable collection "codebook".
Codes that fall out of use can be restarted from vectors of the current batch.

All state updates happen inside `apply(..., mutable=["codebook"])` with `train=True`, with
static shapes only, so a jitted train step on a batch sharded over devices runs them as is.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import EMBEDDING_TABLE_AXES

CODEBOOK_COLLECTION = "codebook"
CODE_COUNT_AXES = ("vocab",)


@flax.struct.dataclass
class QuantizerOutput:
    """What quantising a batch of latents gives.

    Attributes:
      quantized: the latents replaced by their nearest codes, `(..., embedding_dim)`, with
        a straight-through gradient (`z + stop_gradient(q - z)`).
      indices: int32 index of each latent's code, the latents' shape without its last axis.
      loss: scalar, `codebook loss + commitment_beta * commitment loss` (the codebook loss
        is left out when the codebook is an EMA).
      perplexity: `exp` of the entropy of the batch's code histogram: the number of
        equally used codes that would give the same entropy.
      usage: fraction of the codes used at least once in the batch.
    """

    quantized: jax.Array
    indices: jax.Array
    loss: jax.Array
    perplexity: jax.Array
    usage: jax.Array


def _uniform_codebook_init(key: jax.Array, shape: tuple[int, int], dtype: jnp.dtype) -> jax.Array:
    """Uniform in `[-1/n, 1/n]`, `n` the number of codes, as taming-transformers."""
    bound = 1.0 / shape[0]
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _nearest_codes(vectors: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest code (squared Euclidean distance) of each `(M, D)` vector."""
    # |z|^2 - 2 z.e + |e|^2 needs one matmul instead of an (M, N, D) difference tensor; the
    # matmul runs at full float32 precision, since TPUs default to bfloat16 passes.
    cross = jnp.matmul(vectors, codebook.T, precision=jax.lax.Precision.HIGHEST)
    distances = (
        jnp.sum(jnp.square(vectors), axis=1, keepdims=True)
        - 2.0 * cross
        + jnp.sum(jnp.square(codebook), axis=1)[None, :]
    )
    return jnp.argmin(distances, axis=1).astype(jnp.int32)


def _ema(average: jax.Array, value: jax.Array, decay: float) -> jax.Array:
    return decay * average + (1.0 - decay) * value


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation of the last axis, with a gradient-trained or EMA codebook.

    Gradient mode: parameter `embedding` `(num_embeddings, embedding_dim)`, logical axes
    ("vocab", "embed"). EMA mode (`use_ema`): the codebook is not a parameter; the
    "codebook" collection holds `embedding`, `cluster_size` (EMA of the number of vectors
    assigned to each code per batch) and `embed_sum` (EMA of their sum). Both start as if
    every code had been assigned once, to itself, so an unused code keeps its place
    instead of collapsing to zero or blowing up.

    Dead-code restart (`dead_code_threshold > 0`): a code whose EMA count of assigned
    vectors per batch (`cluster_size`; in gradient mode a `usage` counter in the "codebook"
    collection) is below the threshold is moved onto a vector of the batch drawn with the
    "codebook" rng, and its count reset to the threshold. Parameters cannot change inside
    a gradient step, so in gradient mode the move is a per-code `restart_offset` in the
    "codebook" collection: the codebook in use is `embedding + restart_offset` (see
    `codebook`), and gradients reach `embedding` unchanged.

    State changes only when `train=True`, the "codebook" collection is mutable and the
    module is not being initialised; otherwise the codebook is read only.

    Attributes:
      num_embeddings: number of codes.
      embedding_dim: width of a code, the latents' channel count.
      commitment_beta: weight of the commitment loss.
      use_ema: update the codebook by EMA instead of by gradient.
      ema_decay: decay of the EMA statistics (counts, sums, usage).
      epsilon: Laplace smoothing of the EMA cluster sizes.
      dead_code_threshold: EMA count per batch below which a code is restarted; 0 for none.
      dtype: dtype of the quantized output's computation (distances are float32).
      param_dtype: dtype of the codebook.
    """

    num_embeddings: int
    embedding_dim: int
    commitment_beta: float = 0.25
    use_ema: bool = False
    ema_decay: float = 0.99
    epsilon: float = 1e-5
    dead_code_threshold: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        shape = (self.num_embeddings, self.embedding_dim)
        table_init = nn.with_logical_partitioning(_uniform_codebook_init, EMBEDDING_TABLE_AXES)

        def state(name: str, init, axes):
            return self.variable(
                CODEBOOK_COLLECTION, name, nn.with_logical_partitioning(init, axes)
            )

        def ones_per_code():
            return jnp.ones((self.num_embeddings,), self.param_dtype)

        if self.use_ema:
            self.ema_embedding = self.variable(
                CODEBOOK_COLLECTION,
                "embedding",
                lambda: table_init(self.make_rng("params"), shape, self.param_dtype),
            )
            self.cluster_size = state("cluster_size", ones_per_code, CODE_COUNT_AXES)
            self.embed_sum = state(
                "embed_sum", lambda: self.ema_embedding.value, EMBEDDING_TABLE_AXES
            )
        else:
            self.embedding = self.param("embedding", table_init, shape, self.param_dtype)
            if self.dead_code_threshold > 0:
                self.usage = state("usage", ones_per_code, CODE_COUNT_AXES)
                self.restart_offset = state(
                    "restart_offset",
                    lambda: jnp.zeros(shape, self.param_dtype),
                    EMBEDDING_TABLE_AXES,
                )

    def codebook(self) -> jax.Array:
        """The codebook in use, `(num_embeddings, embedding_dim)` (what an export writes)."""
        if self.use_ema:
            return self.ema_embedding.value
        if self.dead_code_threshold > 0:
            return self.embedding + self.restart_offset.value
        return self.embedding

    def __call__(self, latents: jax.Array, train: bool = False) -> QuantizerOutput:
        """Quantises `(..., embedding_dim)` latents; with `train`, updates the codebook state.

        Args:
          latents: the encoder's continuous latents.
          train: update the EMA statistics and restart dead codes (when the "codebook"
            collection is mutable); restarts draw from the "codebook" rng.

        Returns:
          The `QuantizerOutput` of this batch, computed with the codebook before the update.
        """
        if latents.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"latents must have embedding_dim={self.embedding_dim} channels; "
                f"got shape {latents.shape}."
            )
        vectors = latents.reshape(-1, self.embedding_dim).astype(jnp.float32)
        codebook = self.codebook().astype(jnp.float32)
        if self.use_ema:
            codebook = jax.lax.stop_gradient(codebook)
        indices = _nearest_codes(jax.lax.stop_gradient(vectors), codebook)
        codes = jnp.take(codebook, indices, axis=0)

        loss = self.commitment_beta * jnp.mean(jnp.square(vectors - jax.lax.stop_gradient(codes)))
        if not self.use_ema:
            loss = loss + jnp.mean(jnp.square(jax.lax.stop_gradient(vectors) - codes))

        counts = jnp.bincount(indices, length=self.num_embeddings).astype(jnp.float32)
        has_state = self.use_ema or self.dead_code_threshold > 0
        updates_state = train and self.is_mutable_collection(CODEBOOK_COLLECTION)
        if has_state and updates_state and not self.is_initializing():
            self._update_state(jax.lax.stop_gradient(vectors), indices, counts)

        codes = codes.reshape(latents.shape).astype(self.dtype)
        quantized = latents + jax.lax.stop_gradient(codes - latents)
        probabilities = counts / vectors.shape[0]
        entropy = -jnp.sum(jax.scipy.special.xlogy(probabilities, probabilities))
        return QuantizerOutput(
            quantized=quantized,
            indices=indices.reshape(latents.shape[:-1]),
            loss=loss,
            perplexity=jnp.exp(entropy),
            usage=jnp.mean(counts > 0),
        )

    def _update_state(self, vectors: jax.Array, indices: jax.Array, counts: jax.Array) -> None:
        """EMA codebook update and dead-code restart from this batch's `(M, D)` vectors."""
        threshold = self.dead_code_threshold
        if not self.use_ema:
            usage = _ema(self.usage.value, counts, self.ema_decay)
            dead, replacements = self._dead_codes(usage, vectors)
            self.restart_offset.value = jnp.where(
                dead[:, None],
                replacements - jax.lax.stop_gradient(self.embedding),
                self.restart_offset.value,
            ).astype(self.param_dtype)
            self.usage.value = jnp.where(dead, threshold, usage).astype(self.param_dtype)
            return

        cluster_size = _ema(self.cluster_size.value, counts, self.ema_decay)
        sums = jax.ops.segment_sum(vectors, indices, num_segments=self.num_embeddings)
        embed_sum = _ema(self.embed_sum.value, sums, self.ema_decay)
        # Laplace smoothing keeps the division finite for codes with no assignments.
        total = jnp.sum(cluster_size)
        smoothed = (
            (cluster_size + self.epsilon) / (total + self.num_embeddings * self.epsilon) * total
        )
        embedding = embed_sum / smoothed[:, None]
        if threshold > 0:
            dead, replacements = self._dead_codes(cluster_size, vectors)
            embedding = jnp.where(dead[:, None], replacements, embedding)
            embed_sum = jnp.where(dead[:, None], replacements * threshold, embed_sum)
            cluster_size = jnp.where(dead, threshold, cluster_size)
        self.ema_embedding.value = embedding.astype(self.param_dtype)
        self.cluster_size.value = cluster_size.astype(self.param_dtype)
        self.embed_sum.value = embed_sum.astype(self.param_dtype)

    def _dead_codes(
        self, code_counts: jax.Array, vectors: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Which codes are dead `(N,)`, and a batch vector drawn for every code `(N, D)`."""
        draws = jax.random.randint(
            self.make_rng(CODEBOOK_COLLECTION), (self.num_embeddings,), 0, vectors.shape[0]
        )
        return code_counts < self.dead_code_threshold, jnp.take(vectors, draws, axis=0)
