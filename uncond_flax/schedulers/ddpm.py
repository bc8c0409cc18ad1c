"""DDPM scheduler (Ho et al. 2020): an immutable, jittable pytree matching diffusers' DDPMScheduler."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from uncond_flax.errors import check_choice

from . import common
from .common import FlaxSchedulerOutput, static_field

logger = logging.getLogger(__name__)

DDPM_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
VARIANCE_TYPES = (
    "fixed_small",
    "fixed_small_log",
    "fixed_large",
    "fixed_large_log",
    "learned",
    "learned_range",
)
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")

# diffusers' DDPMScheduler.__init__ keywords, in its order (the order of scheduler_config.json).
DDPM_CONFIG_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "variance_type",
    "clip_sample",
    "prediction_type",
    "thresholding",
    "dynamic_thresholding_ratio",
    "clip_sample_range",
    "sample_max_value",
    "timestep_spacing",
    "steps_offset",
    "rescale_betas_zero_snr",
)


@struct.dataclass
class FlaxDDPMScheduler:
    """DDPM noise schedule and ancestral sampler; build it with `create` or `from_config`."""

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    timesteps: jax.Array

    num_train_timesteps: int = static_field()
    beta_start: float = static_field()
    beta_end: float = static_field()
    beta_schedule: str = static_field()
    trained_betas: tuple[float, ...] | None = static_field()
    variance_type: str = static_field()
    clip_sample: bool = static_field()
    prediction_type: str = static_field()
    thresholding: bool = static_field()
    dynamic_thresholding_ratio: float = static_field()
    clip_sample_range: float = static_field()
    sample_max_value: float = static_field()
    timestep_spacing: str = static_field()
    steps_offset: int = static_field()
    rescale_betas_zero_snr: bool = static_field()
    # Set by set_timesteps; None means "step through every training timestep".
    num_inference_steps: int | None = static_field()
    custom_timesteps: bool = static_field()

    init_noise_sigma = 1.0
    order = 1

    @classmethod
    def create(
        cls,
        *,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | np.ndarray | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ) -> FlaxDDPMScheduler:
        """Build the scheduler from diffusers' DDPMScheduler keyword arguments (same names and defaults)."""
        trained = common.freeze_trained_betas(trained_betas)
        common.check_table_options(
            cls.__name__,
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            beta_schedules=DDPM_BETA_SCHEDULES,
            trained_betas=trained,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
        )
        check_choice("variance_type", variance_type, VARIANCE_TYPES, cls.__name__)
        if variance_type == "fixed_large_log":
            logger.warning(
                "variance_type='fixed_large_log' reproduces diffusers, whose DDPM step takes "
                "sqrt(log(beta_t)) and so returns NaN for every timestep > 0."
            )
        betas, alphas, alphas_cumprod = common.make_alpha_tables(
            common.make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, trained),
            rescale_betas_zero_snr,
        )
        return cls(
            betas=jnp.asarray(betas),
            alphas=jnp.asarray(alphas),
            alphas_cumprod=jnp.asarray(alphas_cumprod),
            timesteps=jnp.arange(num_train_timesteps - 1, -1, -1, dtype=jnp.int32),
            num_train_timesteps=int(num_train_timesteps),
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained,
            variance_type=variance_type,
            clip_sample=bool(clip_sample),
            prediction_type=prediction_type,
            thresholding=bool(thresholding),
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            steps_offset=int(steps_offset),
            rescale_betas_zero_snr=bool(rescale_betas_zero_snr),
            num_inference_steps=None,
            custom_timesteps=False,
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FlaxDDPMScheduler:
        """Build from a diffusers scheduler_config.json dict; skips `_` keys, warns about unknown ones."""
        return cls.create(**common.select_init_kwargs(config, DDPM_CONFIG_KEYS, cls.__name__))

    @property
    def config(self) -> dict[str, Any]:
        """The init keyword arguments as a plain JSON-ready dict."""
        return {key: common.to_json_value(getattr(self, key)) for key in DDPM_CONFIG_KEYS}

    def to_config(self) -> dict[str, Any]:
        """Contents of a diffusers scheduler_config.json for DDPMScheduler."""
        return {"_class_name": "DDPMScheduler", "_diffusers_version": common.DIFFUSERS_VERSION, **self.config}

    def __len__(self) -> int:
        return self.num_train_timesteps

    def set_timesteps(
        self, num_inference_steps: int | None = None, timesteps: Sequence[int] | None = None
    ) -> FlaxDDPMScheduler:
        """Return a copy set up for `num_inference_steps` spaced steps, or a custom descending `timesteps`."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps: pass exactly one of num_inference_steps or timesteps.")
        if timesteps is not None:
            values = common.check_custom_timesteps(timesteps, self.num_train_timesteps)
            return self.replace(
                timesteps=jnp.asarray(values, jnp.int32),
                num_inference_steps=len(values),
                custom_timesteps=True,
            )
        values = common.spaced_timesteps(
            self.num_train_timesteps, int(num_inference_steps), self.timestep_spacing, self.steps_offset
        )
        return self.replace(
            timesteps=jnp.asarray(values, jnp.int32),
            num_inference_steps=int(num_inference_steps),
            custom_timesteps=False,
        )

    def previous_timestep(self, timestep: jax.Array | int) -> jax.Array:
        """The timestep the next step lands on (-1 after the last); works with a traced `timestep`."""
        t = jnp.asarray(timestep, jnp.int32)
        if self.num_inference_steps is None and not self.custom_timesteps:
            return t - 1
        # diffusers looks t up in self.timesteps and takes the next entry. The table is strictly
        # descending, so that entry is the largest one below t; this form needs no Python branch.
        return jnp.max(jnp.where(self.timesteps < t, self.timesteps, -1))

    def scale_model_input(self, sample: jax.Array, timestep: jax.Array | int | None = None) -> jax.Array:
        """Identity: DDPM does not rescale the model input (kept for scheduler interchangeability)."""
        return sample

    def add_noise(self, original_samples: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """Forward-diffuse x_0 to x_t for per-example `timesteps` of shape (B,)."""
        return common.add_noise(self.alphas_cumprod, original_samples, noise, timesteps)

    def get_velocity(self, sample: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """v-prediction target for per-example `timesteps` of shape (B,)."""
        return common.get_velocity(self.alphas_cumprod, sample, noise, timesteps)

    def step(
        self,
        model_output: jax.Array,
        timestep: jax.Array | int,
        sample: jax.Array,
        key: jax.Array | None = None,
        variance_noise: jax.Array | None = None,
    ) -> FlaxSchedulerOutput:
        """One ancestral step x_t -> x_{t-1}; noise is `variance_noise` if given, else drawn from `key`."""
        out_dtype = jnp.asarray(sample).dtype
        x_t = jnp.asarray(sample, jnp.float32)
        eps_or_x0, predicted_variance = self._split_learned_variance(jnp.asarray(model_output, jnp.float32), x_t)

        t = jnp.asarray(timestep, jnp.int32)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = common.alpha_bar_at(self.alphas_cumprod, self.previous_timestep(t), 1.0)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        pred_x0 = common.predict_original_sample(self.prediction_type, eps_or_x0, x_t, alpha_prod_t, beta_prod_t)
        pred_x0 = common.clip_or_threshold(
            pred_x0,
            thresholding=self.thresholding,
            clip_sample=self.clip_sample,
            clip_sample_range=self.clip_sample_range,
            dynamic_thresholding_ratio=self.dynamic_thresholding_ratio,
            sample_max_value=self.sample_max_value,
        )

        # Posterior mean, eq. (7) of Ho et al.
        pred_x0_coeff = (jnp.sqrt(alpha_prod_t_prev) * current_beta_t) / beta_prod_t
        x_t_coeff = jnp.sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t
        prev_sample = pred_x0_coeff * pred_x0 + x_t_coeff * x_t

        static_t = common.static_value(timestep)
        if static_t is None or static_t > 0:
            noise = common.resolve_noise(variance_noise, key, eps_or_x0.shape, type(self).__name__)
            scaled_noise = (
                self._noise_scale(alpha_prod_t, alpha_prod_t_prev, current_beta_t, predicted_variance) * noise
            )
            # diffusers adds noise only when t > 0; where() keeps a traced t branch-free.
            prev_sample = prev_sample + jnp.where(t > 0, scaled_noise, 0.0)

        return FlaxSchedulerOutput(
            prev_sample=prev_sample.astype(out_dtype), pred_original_sample=pred_x0.astype(out_dtype)
        )

    def _split_learned_variance(self, model_output: jax.Array, sample: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """Learned-variance models emit 2C channels, [prediction, variance], on the last (NHWC) axis."""
        if self.variance_type not in LEARNED_VARIANCE_TYPES:
            return model_output, None
        channels = sample.shape[-1]
        if model_output.shape[-1] != 2 * channels:
            raise ValueError(
                f"variance_type={self.variance_type!r} needs model_output with {2 * channels} channels on "
                f"the last axis (prediction and variance), got shape {model_output.shape}."
            )
        return model_output[..., :channels], model_output[..., channels:]

    def _noise_scale(
        self,
        alpha_prod_t: jax.Array,
        alpha_prod_t_prev: jax.Array,
        current_beta_t: jax.Array,
        predicted_variance: jax.Array | None,
    ) -> jax.Array:
        """Factor multiplying N(0, 1) noise for this variance_type, exactly as diffusers' step applies it."""
        # Posterior variance beta_tilde, clamped because some types take its log.
        posterior_variance = jnp.maximum((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, 1e-20)
        kind = self.variance_type
        if kind == "fixed_small":
            return jnp.sqrt(posterior_variance)
        if kind == "fixed_small_log":
            return jnp.exp(0.5 * jnp.log(posterior_variance))
        if kind == "fixed_large":
            return jnp.sqrt(current_beta_t)
        if kind == "fixed_large_log":
            # diffusers: sqrt of a log-variance (< 0), i.e. NaN; kept for exact parity (warned in create).
            return jnp.sqrt(jnp.log(current_beta_t))
        if kind == "learned":
            return jnp.sqrt(predicted_variance)
        # learned_range: the model interpolates between log beta_tilde and log beta in [-1, 1].
        frac = (predicted_variance + 1) / 2
        log_variance = frac * jnp.log(current_beta_t) + (1 - frac) * jnp.log(posterior_variance)
        return jnp.exp(0.5 * log_variance)
