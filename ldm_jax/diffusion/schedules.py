"""Noise schedules of the forward process and the timesteps a sampler visits.

The betas are computed in float64 NumPy and cast once to float32, as the original LDM code
does, so ``alphas_cumprod`` carries no float32 accumulation error over 1000 steps.
"""

from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


def validate_choice(argument: str, value: str, allowed: Sequence[str]) -> None:
    """Raises a ValueError naming ``argument`` and the allowed values if ``value`` is not one."""
    if value not in allowed:
        raise ValueError(f"{argument} must be one of {tuple(allowed)}, got {value!r}")


@flax.struct.dataclass
class NoiseSchedule:
    """The variance schedule of q(z_t | z_0) = N(sqrt(ᾱ_t)·z_0, (1 − ᾱ_t)·I).

    A pytree: it can be passed into jitted functions or closed over.

    Attributes:
        betas: Per-step noise variances β_t, shape (T,), float32.
        alphas_cumprod: ᾱ_t = ∏_{s≤t} (1 − β_s), shape (T,), float32.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array

    @property
    def num_timesteps(self) -> int:
        """Number of training timesteps T (static, from the array shape)."""
        return self.betas.shape[0]

    @property
    def sqrt_alphas_cumprod(self) -> jax.Array:
        """sqrt(ᾱ_t), the signal scale of z_t."""
        return jnp.sqrt(self.alphas_cumprod)

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> jax.Array:
        """sqrt(1 − ᾱ_t), the noise scale of z_t."""
        return jnp.sqrt(1.0 - self.alphas_cumprod)


def _linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def _scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    # Linear in sqrt(beta): the schedule of LDM and Stable Diffusion.
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def _cosine_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    # Nichol & Dhariwal (2021): ᾱ(s) = cos²((s + 0.008) / 1.008 · π/2), betas capped at 0.999
    # so the last step stays invertible. The beta range does not apply.
    del beta_start, beta_end
    fraction = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    alpha_bar = np.cos((fraction + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)


_BETA_FUNCTIONS: dict[str, Callable[[int, float, float], np.ndarray]] = {
    "linear": _linear_betas,
    "scaled_linear": _scaled_linear_betas,
    "cosine": _cosine_betas,
}
SCHEDULE_KINDS = tuple(_BETA_FUNCTIONS)


def make_schedule(
    kind: str = "scaled_linear",
    num_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> NoiseSchedule:
    """Builds a noise schedule.

    Args:
        kind: One of ``SCHEDULE_KINDS``: "linear" (DDPM), "scaled_linear" (LDM / Stable
            Diffusion) or "cosine" (improved DDPM, ignores the beta range).
        num_timesteps: Number of training timesteps T.
        beta_start: β_0 of the linear kinds.
        beta_end: β_{T−1} of the linear kinds.

    Returns:
        The schedule with float32 arrays.

    Raises:
        ValueError: If ``kind`` is unknown, ``num_timesteps`` < 1, or the beta range is not
            0 < beta_start <= beta_end < 1.
    """
    validate_choice("kind", kind, SCHEDULE_KINDS)
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, "
            f"got beta_start={beta_start}, beta_end={beta_end}"
        )
    betas = _BETA_FUNCTIONS[kind](num_timesteps, beta_start, beta_end)
    alphas_cumprod = np.cumprod(1.0 - betas)
    return NoiseSchedule(
        betas=jnp.asarray(betas, jnp.float32),
        alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
    )


def _leading_timesteps(num_timesteps: int, num_points: int, steps_offset: int) -> np.ndarray:
    return np.arange(num_points)[::-1] * (num_timesteps // num_points) + steps_offset


def _trailing_timesteps(num_timesteps: int, num_points: int, steps_offset: int) -> np.ndarray:
    # diffusers writes np.arange(T, 0, -T/n); the same values, but a float stop can add an
    # element, so the count is fixed here.
    del steps_offset
    return np.round(num_timesteps - np.arange(num_points) * (num_timesteps / num_points)) - 1


def _linspace_timesteps(num_timesteps: int, num_points: int, steps_offset: int) -> np.ndarray:
    del steps_offset
    return np.linspace(0, num_timesteps - 1, num_points).round()[::-1]


_SPACINGS: dict[str, Callable[[int, int, int], np.ndarray]] = {
    "leading": _leading_timesteps,
    "trailing": _trailing_timesteps,
    "linspace": _linspace_timesteps,
}
TIMESTEP_SPACINGS = tuple(_SPACINGS)


def sampling_timesteps(
    num_timesteps: int,
    num_steps: int,
    spacing: str = "leading",
    steps_offset: int = 1,
    drop_last_grid_point: bool = False,
) -> np.ndarray:
    """The descending timesteps a sampler visits, as diffusers' ``set_timesteps`` picks them.

    Args:
        num_timesteps: Number of training timesteps T.
        num_steps: Number of sampling steps, in [1, T].
        spacing: One of ``TIMESTEP_SPACINGS`` (diffusers' ``timestep_spacing``).
        steps_offset: Added to every timestep of the "leading" spacing (Stable Diffusion
            uses 1); the other spacings ignore it.
        drop_last_grid_point: Lay out ``num_steps + 1`` points by the "leading" or "linspace"
            rule and visit all but the lowest, as diffusers' DPM-Solver schedulers do: their
            last step goes to noise level zero in its place. "trailing" already stops one
            stride above 0 and is unchanged.

    Returns:
        int32 array of shape (num_steps,), strictly descending, within [0, T).

    Raises:
        ValueError: If ``spacing`` is unknown, ``num_steps`` is outside [1, T] or too large for
            distinct timesteps, or ``steps_offset`` pushes a "leading" timestep to T or beyond.
    """
    validate_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"num_steps must be in [1, num_timesteps={num_timesteps}], got {num_steps}"
        )
    num_points = num_steps + 1 if drop_last_grid_point and spacing != "trailing" else num_steps
    timesteps = _SPACINGS[spacing](num_timesteps, num_points, steps_offset)[:num_steps]
    timesteps = timesteps.astype(np.int32)
    if np.any(np.diff(timesteps) >= 0):
        raise ValueError(
            f"num_steps={num_steps} repeats timesteps with the {spacing!r} spacing of this "
            f"sampler; use num_steps < {num_timesteps}"
        )
    if timesteps.max() >= num_timesteps or timesteps.min() < 0:
        raise ValueError(
            f"steps_offset={steps_offset} puts the timesteps {timesteps.min()}..{timesteps.max()} "
            f"outside [0, {num_timesteps}); use fewer num_steps or a smaller steps_offset"
        )
    return timesteps
