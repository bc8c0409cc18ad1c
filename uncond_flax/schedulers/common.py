"""Shared pieces of the DDPM/DDIM schedulers: beta tables, timestep spacing, noising and config I/O.

Tables are built in numpy, replaying diffusers' PyTorch float32 arithmetic step by step (including
torch's float64 cumprod accumulator on CPU), so they agree with diffusers to float32 rounding. The
per-step maths is jnp, free of Python branches on traced values.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from uncond_flax.errors import check_choice

logger = logging.getLogger(__name__)

# Written into `_diffusers_version` of exported configs: the diffusers release our numerics track.
DIFFUSERS_VERSION = "0.42.1"

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")

_F32 = np.float32


def static_field() -> Any:
    """A static (non-pytree) dataclass field: part of the jit cache key, never traced."""
    return struct.field(pytree_node=False)


@struct.dataclass
class FlaxSchedulerOutput:
    """Result of one reverse-diffusion step: x_{t-1} and the model's estimate of x_0."""

    prev_sample: jax.Array
    pred_original_sample: jax.Array


# --------------------------------------------------------------------------------------------
# Option validation and config I/O
# --------------------------------------------------------------------------------------------


def check_table_options(
    owner: str,
    *,
    num_train_timesteps: int,
    beta_schedule: str,
    beta_schedules: Sequence[str],
    trained_betas: Sequence[float] | None,
    prediction_type: str,
    timestep_spacing: str,
) -> None:
    """Validate the options shared by DDPM and DDIM, raising ValueError that names the offending key."""
    if (
        isinstance(num_train_timesteps, bool)
        or not isinstance(num_train_timesteps, (int, np.integer))
        or num_train_timesteps < 1
    ):
        raise ValueError(f"{owner}: num_train_timesteps={num_train_timesteps!r} must be a positive integer.")
    check_choice("beta_schedule", beta_schedule, beta_schedules, owner)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES, owner)
    check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS, owner)
    if trained_betas is not None and len(trained_betas) != num_train_timesteps:
        raise ValueError(
            f"{owner}: trained_betas has {len(trained_betas)} values but num_train_timesteps={num_train_timesteps}."
        )


def select_init_kwargs(config: Mapping[str, Any], init_keys: Iterable[str], owner: str) -> dict[str, Any]:
    """Keep the keys of a diffusers scheduler config that `owner` accepts; warn about the others."""
    init_keys = tuple(init_keys)
    kwargs = {k: v for k, v in config.items() if k in init_keys}
    # Underscore keys are diffusers metadata (_class_name, _diffusers_version, _use_default_values).
    unknown = sorted(k for k in config if k not in init_keys and not k.startswith("_"))
    if unknown:
        logger.warning("%s ignores config keys it does not use: %s", owner, ", ".join(unknown))
    return kwargs


def to_json_value(value: Any) -> Any:
    """Turn a config value into its plain JSON form (tuples/arrays -> lists, numpy scalars -> Python)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (tuple, list)):
        return [to_json_value(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def freeze_trained_betas(trained_betas: Any) -> tuple[float, ...] | None:
    """Store trained betas as a hashable tuple of Python floats (they are a static pytree field)."""
    if trained_betas is None:
        return None
    return tuple(float(b) for b in np.asarray(trained_betas, dtype=np.float64).reshape(-1))


# --------------------------------------------------------------------------------------------
# Beta schedules (numpy, float32 like torch)
# --------------------------------------------------------------------------------------------


def torch_linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """float32 linspace with torch's formula: a float32 step, filled from the start and the end halves."""
    if num == 1:
        return np.array([start], dtype=_F32)
    first, last = _F32(start), _F32(end)
    step = (last - first) / _F32(num - 1)
    index = np.arange(num)
    from_start = first + step * index.astype(_F32)
    from_end = last - step * (num - 1 - index).astype(_F32)
    return np.where(index < num // 2, from_start, from_end).astype(_F32)


def betas_for_alpha_bar(
    num_train_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous alpha_bar(t), t in [0, 1], into betas capped at `max_beta` (float64 maths)."""
    betas = []
    for i in range(num_train_timesteps):
        t_now, t_next = i / num_train_timesteps, (i + 1) / num_train_timesteps
        betas.append(min(1 - alpha_bar(t_next) / alpha_bar(t_now), max_beta))
    return np.asarray(betas, dtype=np.float64).astype(_F32)


def _cosine_alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_alpha_bar(t: float) -> float:
    lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(lmb)
    return math.sqrt(snr / (1 + snr))


def _linear_betas(n: int, beta_start: float, beta_end: float) -> np.ndarray:
    return torch_linspace_f32(beta_start, beta_end, n)


def _scaled_linear_betas(n: int, beta_start: float, beta_end: float) -> np.ndarray:
    root = torch_linspace_f32(beta_start**0.5, beta_end**0.5, n)
    return root * root


def _squaredcos_cap_v2_betas(n: int, beta_start: float, beta_end: float) -> np.ndarray:
    return betas_for_alpha_bar(n, _cosine_alpha_bar)


def _laplace_betas(n: int, beta_start: float, beta_end: float) -> np.ndarray:
    return betas_for_alpha_bar(n, _laplace_alpha_bar)


def _sigmoid_betas(n: int, beta_start: float, beta_end: float) -> np.ndarray:
    x = torch_linspace_f32(-6.0, 6.0, n)
    sigmoid = (_F32(1) / (_F32(1) + np.exp(-x))).astype(_F32)
    # torch multiplies a float32 tensor by Python scalars in float32.
    return (sigmoid * _F32(beta_end - beta_start) + _F32(beta_start)).astype(_F32)


BETA_SCHEDULES: dict[str, Callable[[int, float, float], np.ndarray]] = {
    "linear": _linear_betas,
    "scaled_linear": _scaled_linear_betas,
    "squaredcos_cap_v2": _squaredcos_cap_v2_betas,
    "sigmoid": _sigmoid_betas,
    "laplace": _laplace_betas,
}


def make_betas(
    beta_schedule: str,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    trained_betas: Sequence[float] | None = None,
) -> np.ndarray:
    """float32 betas for a named schedule, or `trained_betas` verbatim when given (as diffusers does)."""
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float64).astype(_F32)
    return BETA_SCHEDULES[beta_schedule](num_train_timesteps, beta_start, beta_end)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    """Cumulative product as torch computes it on CPU: float64 accumulator, float32 results."""
    return np.cumprod(np.asarray(x, dtype=_F32).astype(np.float64)).astype(_F32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so the final alpha_bar is exactly 0 (arXiv:2305.08891, Algorithm 1), in float32."""
    alphas = (_F32(1) - np.asarray(betas, dtype=_F32)).astype(_F32)
    sqrt_bar = np.sqrt(cumprod_f32(alphas)).astype(_F32)
    first, last = sqrt_bar[0], sqrt_bar[-1]
    sqrt_bar = (sqrt_bar - last) * (first / (first - last))
    alphas_bar = sqrt_bar * sqrt_bar
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (_F32(1) - alphas).astype(_F32)


def make_alpha_tables(betas: np.ndarray, rescale_betas_zero_snr: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(betas, alphas, alphas_cumprod) in float32, optionally rescaled to zero terminal SNR."""
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas = (_F32(1) - betas).astype(_F32)
    return betas.astype(_F32), alphas, cumprod_f32(alphas)


# --------------------------------------------------------------------------------------------
# Inference timesteps
# --------------------------------------------------------------------------------------------


def spaced_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """Descending inference timesteps for a spacing (Table 2 of arXiv:2305.08891), as diffusers does."""
    if not 0 < num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} must be between 1 and num_train_timesteps="
            f"{num_train_timesteps}."
        )
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS, "spaced_timesteps")
    if spacing == "linspace":
        grid = np.linspace(0, num_train_timesteps - 1, num_inference_steps)
        timesteps = grid.round()[::-1].astype(np.int64)
    elif spacing == "leading":
        step_ratio = num_train_timesteps // num_inference_steps
        grid = np.arange(num_inference_steps) * step_ratio
        timesteps = grid.round()[::-1].astype(np.int64) + steps_offset
    else:  # trailing
        step_ratio = num_train_timesteps / num_inference_steps
        grid = np.arange(num_train_timesteps, 0, -step_ratio)
        timesteps = np.round(grid).astype(np.int64) - 1
    if timesteps.max() >= num_train_timesteps:
        # diffusers would only fail later with an index error inside step().
        raise ValueError(
            f"steps_offset={steps_offset} pushes timestep {timesteps.max()} past num_train_timesteps="
            f"{num_train_timesteps} for num_inference_steps={num_inference_steps}."
        )
    return timesteps


def check_custom_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> np.ndarray:
    """Validate a user timestep list (strictly descending, within [0, num_train_timesteps))."""
    values = np.asarray(timesteps, dtype=np.int64).reshape(-1)
    if values.size == 0:
        raise ValueError("timesteps must not be empty.")
    if np.any(np.diff(values) >= 0):
        raise ValueError(f"timesteps must be strictly descending, got {values.tolist()}.")
    if values[0] >= num_train_timesteps or values[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps}), got {values.tolist()}.")
    return values


# --------------------------------------------------------------------------------------------
# Forward process helpers (jittable)
# --------------------------------------------------------------------------------------------


def _per_batch(values: jax.Array, ndim: int) -> jax.Array:
    """Shape (B,) per-example factors as (B, 1, ..., 1) so they broadcast over a rank-`ndim` batch."""
    values = values.reshape(-1)
    return values.reshape(values.shape + (1,) * (ndim - 1))


def _signal_and_noise_scales(alphas_cumprod: jax.Array, timesteps: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
    alpha_bar = alphas_cumprod[jnp.asarray(timesteps, jnp.int32)]
    return _per_batch(jnp.sqrt(alpha_bar), ndim), _per_batch(jnp.sqrt(1 - alpha_bar), ndim)


def add_noise(
    alphas_cumprod: jax.Array, original_samples: jax.Array, noise: jax.Array, timesteps: jax.Array
) -> jax.Array:
    """q(x_t | x_0): sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * noise, per batch element."""
    x0 = jnp.asarray(original_samples)
    signal, sigma = _signal_and_noise_scales(alphas_cumprod, timesteps, x0.ndim)
    noisy = signal * x0.astype(jnp.float32) + sigma * jnp.asarray(noise, jnp.float32)
    return noisy.astype(x0.dtype)


def get_velocity(alphas_cumprod: jax.Array, sample: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """v-prediction target: sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * x_0, per batch element."""
    x0 = jnp.asarray(sample)
    signal, sigma = _signal_and_noise_scales(alphas_cumprod, timesteps, x0.ndim)
    velocity = signal * jnp.asarray(noise, jnp.float32) - sigma * x0.astype(jnp.float32)
    return velocity.astype(x0.dtype)


# --------------------------------------------------------------------------------------------
# Reverse step helpers (jittable)
# --------------------------------------------------------------------------------------------


def alpha_bar_at(alphas_cumprod: jax.Array, timestep: jax.Array, before_start: jax.Array | float) -> jax.Array:
    """alphas_cumprod[timestep], or `before_start` when timestep < 0; branch-free, so t may be traced."""
    safe = jnp.maximum(timestep, 0)
    return jnp.where(timestep >= 0, alphas_cumprod[safe], jnp.asarray(before_start, jnp.float32))


def predict_original_sample(
    prediction_type: str,
    model_output: jax.Array,
    sample: jax.Array,
    alpha_prod_t: jax.Array,
    beta_prod_t: jax.Array,
) -> jax.Array:
    """x_0 estimate from an epsilon, sample or v prediction (same operation order as diffusers)."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES, "predict_original_sample")
    if prediction_type == "epsilon":
        return (sample - jnp.sqrt(beta_prod_t) * model_output) / jnp.sqrt(alpha_prod_t)
    if prediction_type == "sample":
        return model_output
    return jnp.sqrt(alpha_prod_t) * sample - jnp.sqrt(beta_prod_t) * model_output


def torch_quantile_last_axis(x: jax.Array, q: float) -> jax.Array:
    """Linear-interpolation quantile over the last axis, with torch.quantile's float32 rank and lerp."""
    n = x.shape[-1]
    ordered = jnp.sort(x, axis=-1)
    rank = _F32(q) * _F32(n - 1)
    lower, upper = int(np.floor(rank)), int(np.ceil(rank))
    weight = _F32(rank - _F32(lower))
    below, above = ordered[..., lower], ordered[..., upper]
    # torch.lerp switches formula at weight 0.5 for accuracy near the upper end.
    value = below + weight * (above - below) if weight < 0.5 else above - (above - below) * (_F32(1) - weight)
    return jnp.where(jnp.isnan(x).any(axis=-1), jnp.nan, value)


def dynamic_threshold(sample: jax.Array, ratio: float, max_value: float) -> jax.Array:
    """Imagen dynamic thresholding: per example, clip to s = `ratio`-quantile of |x| (in [1, max]), / s."""
    flat = sample.reshape(sample.shape[0], -1)
    s = jnp.clip(torch_quantile_last_axis(jnp.abs(flat), ratio), 1.0, max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(sample.shape)


def clip_or_threshold(
    pred_original_sample: jax.Array,
    *,
    thresholding: bool,
    clip_sample: bool,
    clip_sample_range: float,
    dynamic_thresholding_ratio: float,
    sample_max_value: float,
) -> jax.Array:
    """Dynamic thresholding if enabled, else clipping if enabled (thresholding wins, as in diffusers)."""
    if thresholding:
        return dynamic_threshold(pred_original_sample, dynamic_thresholding_ratio, sample_max_value)
    if clip_sample:
        return jnp.clip(pred_original_sample, -clip_sample_range, clip_sample_range)
    return pred_original_sample


def static_value(x: Any) -> float | None:
    """The Python value of a concrete scalar, or None when `x` is traced (unknown at trace time)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x).item()


def resolve_noise(
    variance_noise: jax.Array | None, key: jax.Array | None, shape: tuple[int, ...], owner: str
) -> jax.Array:
    """Noise for a stochastic step: `variance_noise` if given, else N(0, 1) drawn from `key`."""
    if variance_noise is not None:
        noise = jnp.asarray(variance_noise, jnp.float32)
        if noise.shape != tuple(shape):
            raise ValueError(f"{owner}.step: variance_noise has shape {noise.shape}, expected {tuple(shape)}.")
        return noise
    if key is not None:
        return jax.random.normal(key, shape, jnp.float32)
    raise ValueError(
        f"{owner}.step needs noise here (the step is stochastic, or its timestep/eta is traced so it "
        "may be): pass `key` (a jax.random key) or `variance_noise` (an array shaped like `sample`)."
    )
