"""The training config checked in one place, before anything compiles, and the schedulers it describes."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections

from uncond_flax.data import check_resolution
from uncond_flax.errors import check_choice
from uncond_flax.export import load_unet_config
from uncond_flax.metrics import check_logger
from uncond_flax.models import resolve_unet_config
from uncond_flax.optim import GRAD_NORM_REDUCTIONS, lr_schedule_for
from uncond_flax.schedulers import FlaxDDIMScheduler, FlaxDDPMScheduler
from uncond_flax.schedulers.common import PREDICTION_TYPES

COMPUTE_DTYPES = {"no": jnp.float32, "fp16": jnp.float16, "bf16": jnp.bfloat16}
SAMPLE_SCHEDULERS = ("ddpm", "ddim")
ACCUMULATION_LOOPS = ("auto", "unrolled", "scan")  # the step's loop over micro-batches (step.resolve_accumulation_loop)
# Fields that hold credentials: used while the run lives, never written to a checkpoint, a log or a logger.
SECRET_FIELDS = ("hub_token",)

_POSITIVE_INTS = (
    "train_batch_size",
    "eval_batch_size",
    "gradient_accumulation_steps",
    "num_epochs",
    "save_images_epochs",
    "save_model_epochs",
    "ddpm_num_steps",
    "ddpm_num_inference_steps",
    "max_consecutive_skips",
    "log_every",
)
_OPTIONAL_POSITIVE_INTS = ("max_train_steps", "checkpoints_total_limit", "sample_num_inference_steps")


class ConfigError(ValueError):
    """A bad config, dataset or path, found before anything compiles; the message is one line."""


def _check_int(config: Any, key: str, minimum: int, hint: str = "") -> None:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r} must be an integer >= {minimum}{hint}")


def check_fields(config: Any) -> None:
    """Every choice and count in the config (not the model), each error naming its field."""
    check_choice("mixed_precision", config.mixed_precision, tuple(COMPUTE_DTYPES))
    check_choice("prediction_type", config.prediction_type, PREDICTION_TYPES)
    check_choice("sample_scheduler", config.sample_scheduler, SAMPLE_SCHEDULERS)
    check_choice("accumulation_loop", config.accumulation_loop, ACCUMULATION_LOOPS)
    check_choice("grad_norm_reduction", config.get("grad_norm_reduction", "per_leaf"), GRAD_NORM_REDUCTIONS)
    check_logger(config.logger)
    lr_schedule_for(config, 1)
    for key in _POSITIVE_INTS:
        _check_int(config, key, 1)
    for key in _OPTIONAL_POSITIVE_INTS:
        if config[key] is not None:
            _check_int(config, key, 1, " (or None)")
    # diffusers saves every checkpointing_steps; 0 is ours for "only on SIGTERM". Negative is a typo, not a period.
    _check_int(config, "checkpointing_steps", 0, " (0: only when preempted)")


def _check_unconditional(unet: dict[str, Any]) -> None:
    """Class embeddings need class labels at every call, and an unconditional run has none: refuse now."""
    for key in ("class_embed_type", "num_class_embeds"):
        if unet.get(key) is not None:
            raise ValueError(
                f"model.{key}={unet[key]!r} makes a class-conditional UNet, which needs class labels that "
                f"unconditional training does not have; leave model.class_embed_type and model.num_class_embeds None"
            )


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A checked copy whose `model` holds the full UNet2DModel config; every error here comes before compiling.

    The model comes from `init_from` (weights too), else `model_config_name_or_path`, else `config.model`
    with `sample_size = resolution`, as diffusers' trainer builds it.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    check_fields(config)
    noise_scheduler_for(config)  # beta schedule, prediction type

    if config.init_from:
        unet = load_unet_config(config.init_from)
    elif config.model_config_name_or_path:
        unet = load_unet_config(config.model_config_name_or_path)
    else:
        unet = dict(config.model.to_dict(), sample_size=config.resolution)
    unet = resolve_unet_config(unet)
    if unet["sample_size"] is None:
        unet["sample_size"] = config.resolution
    _check_unconditional(unet)
    check_resolution(config.resolution, unet["block_out_channels"])
    config.model = ml_collections.ConfigDict({k: list(v) if isinstance(v, tuple) else v for k, v in unet.items()})
    return config


def storable(config: Any) -> dict[str, Any]:
    """The config as a dict without credentials: what checkpoints, loggers and model cards may hold."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in values.items() if k not in SECRET_FIELDS}


def noise_scheduler_for(config: Any) -> FlaxDDPMScheduler:
    """The training noise schedule, as diffusers' trainer builds its DDPMScheduler."""
    return FlaxDDPMScheduler.create(
        num_train_timesteps=config.ddpm_num_steps,
        beta_schedule=config.ddpm_beta_schedule,
        prediction_type=config.prediction_type,
    )


def preview_scheduler_for(config: Any, noise_scheduler: FlaxDDPMScheduler) -> FlaxDDPMScheduler | FlaxDDIMScheduler:
    """The sampler for preview grids: the training schedule itself, or DDIM over the same betas."""
    if config.sample_scheduler == "ddim":
        ddim = {k: v for k, v in noise_scheduler.to_config().items() if k != "variance_type"}
        return FlaxDDIMScheduler.from_config(ddim)
    return noise_scheduler
