"""DDIM scheduler (Song et al. 2020): an immutable, jittable pytree matching diffusers' DDIMScheduler."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import common
from .common import FlaxSchedulerOutput, static_field

# diffusers' DDIMScheduler builds only these (no sigmoid/laplace, unlike DDPM).
DDIM_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

# diffusers' DDIMScheduler.__init__ keywords, in its order (the order of scheduler_config.json).
DDIM_CONFIG_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "clip_sample",
    "set_alpha_to_one",
    "steps_offset",
    "prediction_type",
    "thresholding",
    "dynamic_thresholding_ratio",
    "clip_sample_range",
    "sample_max_value",
    "timestep_spacing",
    "rescale_betas_zero_snr",
)


@struct.dataclass
class FlaxDDIMScheduler:
    """DDIM noise schedule and eta-sampler; build with `create`/`from_config`, then `set_timesteps`."""

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    # alpha_bar "before" timestep 0, used by the last step: 1.0, or alphas_cumprod[0]
    # when set_alpha_to_one is False.
    final_alpha_cumprod: jax.Array
    timesteps: jax.Array

    num_train_timesteps: int = static_field()
    beta_start: float = static_field()
    beta_end: float = static_field()
    beta_schedule: str = static_field()
    trained_betas: tuple[float, ...] | None = static_field()
    clip_sample: bool = static_field()
    set_alpha_to_one: bool = static_field()
    steps_offset: int = static_field()
    prediction_type: str = static_field()
    thresholding: bool = static_field()
    dynamic_thresholding_ratio: float = static_field()
    clip_sample_range: float = static_field()
    sample_max_value: float = static_field()
    timestep_spacing: str = static_field()
    rescale_betas_zero_snr: bool = static_field()
    num_inference_steps: int | None = static_field()

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
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ) -> FlaxDDIMScheduler:
        """Build the scheduler from diffusers' DDIMScheduler keyword arguments (same names and defaults)."""
        trained = common.freeze_trained_betas(trained_betas)
        common.check_table_options(
            cls.__name__,
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            beta_schedules=DDIM_BETA_SCHEDULES,
            trained_betas=trained,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
        )
        betas, alphas, alphas_cumprod = common.make_alpha_tables(
            common.make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, trained),
            rescale_betas_zero_snr,
        )
        final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else alphas_cumprod[0]
        return cls(
            betas=jnp.asarray(betas),
            alphas=jnp.asarray(alphas),
            alphas_cumprod=jnp.asarray(alphas_cumprod),
            final_alpha_cumprod=jnp.asarray(final_alpha_cumprod, jnp.float32),
            timesteps=jnp.arange(num_train_timesteps - 1, -1, -1, dtype=jnp.int32),
            num_train_timesteps=int(num_train_timesteps),
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained,
            clip_sample=bool(clip_sample),
            set_alpha_to_one=bool(set_alpha_to_one),
            steps_offset=int(steps_offset),
            prediction_type=prediction_type,
            thresholding=bool(thresholding),
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            rescale_betas_zero_snr=bool(rescale_betas_zero_snr),
            num_inference_steps=None,
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FlaxDDIMScheduler:
        """Build from a diffusers scheduler_config.json dict; skips `_` keys, warns about unknown ones."""
        return cls.create(**common.select_init_kwargs(config, DDIM_CONFIG_KEYS, cls.__name__))

    @property
    def config(self) -> dict[str, Any]:
        """The init keyword arguments as a plain JSON-ready dict."""
        return {key: common.to_json_value(getattr(self, key)) for key in DDIM_CONFIG_KEYS}

    def to_config(self) -> dict[str, Any]:
        """Contents of a diffusers scheduler_config.json for DDIMScheduler."""
        return {"_class_name": "DDIMScheduler", "_diffusers_version": common.DIFFUSERS_VERSION, **self.config}

    def __len__(self) -> int:
        return self.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int) -> FlaxDDIMScheduler:
        """Return a copy set up for `num_inference_steps` steps spaced per `timestep_spacing`."""
        values = common.spaced_timesteps(
            self.num_train_timesteps, int(num_inference_steps), self.timestep_spacing, self.steps_offset
        )
        return self.replace(timesteps=jnp.asarray(values, jnp.int32), num_inference_steps=int(num_inference_steps))

    def previous_timestep(self, timestep: jax.Array | int) -> jax.Array:
        """diffusers' DDIM rule: t - num_train_timesteps // num_inference_steps (for every spacing)."""
        if self.num_inference_steps is None:
            raise ValueError("FlaxDDIMScheduler: call set_timesteps(num_inference_steps) before stepping.")
        return jnp.asarray(timestep, jnp.int32) - self.num_train_timesteps // self.num_inference_steps

    def scale_model_input(self, sample: jax.Array, timestep: jax.Array | int | None = None) -> jax.Array:
        """Identity: DDIM does not rescale the model input (kept for scheduler interchangeability)."""
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
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        key: jax.Array | None = None,
        variance_noise: jax.Array | None = None,
    ) -> FlaxSchedulerOutput:
        """One DDIM step x_t -> x_prev (eq. 12, Song et al.); eta > 0 adds `variance_noise` or `key` noise."""
        out_dtype = jnp.asarray(sample).dtype
        x_t = jnp.asarray(sample, jnp.float32)
        model_output = jnp.asarray(model_output, jnp.float32)

        t = jnp.asarray(timestep, jnp.int32)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = common.alpha_bar_at(
            self.alphas_cumprod, self.previous_timestep(t), self.final_alpha_cumprod
        )
        beta_prod_t = 1 - alpha_prod_t

        pred_x0 = common.predict_original_sample(self.prediction_type, model_output, x_t, alpha_prod_t, beta_prod_t)
        pred_epsilon = _predict_epsilon(self.prediction_type, model_output, x_t, pred_x0, alpha_prod_t, beta_prod_t)
        pred_x0 = common.clip_or_threshold(
            pred_x0,
            thresholding=self.thresholding,
            clip_sample=self.clip_sample,
            clip_sample_range=self.clip_sample_range,
            dynamic_thresholding_ratio=self.dynamic_thresholding_ratio,
            sample_max_value=self.sample_max_value,
        )

        # sigma_t(eta), eq. (16) of Song et al.
        variance = ((1 - alpha_prod_t_prev) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = eta * jnp.sqrt(variance)
        if use_clipped_model_output:
            # Re-derive epsilon from the clipped x_0 so the two stay consistent (as in GLIDE).
            pred_epsilon = (x_t - jnp.sqrt(alpha_prod_t) * pred_x0) / jnp.sqrt(beta_prod_t)

        direction_to_x_t = jnp.sqrt(1 - alpha_prod_t_prev - std_dev_t**2) * pred_epsilon
        prev_sample = jnp.sqrt(alpha_prod_t_prev) * pred_x0 + direction_to_x_t

        static_eta = common.static_value(eta)
        if static_eta is None or static_eta > 0:
            noise = common.resolve_noise(variance_noise, key, model_output.shape, type(self).__name__)
            # diffusers adds noise only when eta > 0; where() keeps a traced eta branch-free.
            prev_sample = prev_sample + jnp.where(jnp.asarray(eta) > 0, std_dev_t * noise, 0.0)

        return FlaxSchedulerOutput(
            prev_sample=prev_sample.astype(out_dtype), pred_original_sample=pred_x0.astype(out_dtype)
        )


def _predict_epsilon(
    prediction_type: str,
    model_output: jax.Array,
    sample: jax.Array,
    pred_original_sample: jax.Array,
    alpha_prod_t: jax.Array,
    beta_prod_t: jax.Array,
) -> jax.Array:
    """Noise estimate implied by the model output, before any clipping of x_0."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - jnp.sqrt(alpha_prod_t) * pred_original_sample) / jnp.sqrt(beta_prod_t)
    return jnp.sqrt(alpha_prod_t) * model_output + jnp.sqrt(beta_prod_t) * sample
