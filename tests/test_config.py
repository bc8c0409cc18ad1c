"""The config checked before anything compiles, and the schedulers it describes against diffusers' script's."""

import numpy as np
import pytest
from diffusers import DDIMScheduler, DDPMScheduler

from uncond_flax.config import noise_scheduler_for, preview_scheduler_for, resolve_config
from uncond_flax.schedulers import FlaxDDIMScheduler

from test_train import tiny_config

# Counts that must be positive integers (the loop divides by the epoch periods, steps and batches by the others).
POSITIVE = (
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
OPTIONAL_POSITIVE = ("max_train_steps", "checkpoints_total_limit", "sample_num_inference_steps")


@pytest.mark.parametrize("field", POSITIVE + OPTIONAL_POSITIVE)
def test_counts_must_be_positive_integers(tmp_path, field):
    for bad in (0, -3, True):  # a bool is an int to Python, never a count
        with pytest.raises(ValueError, match=rf"^{field}={bad!r} must be an integer >= 1"):
            resolve_config(tiny_config(tmp_path, **{field: bad}))
    resolve_config(tiny_config(tmp_path, **{field: 2}))
    if field in OPTIONAL_POSITIVE:
        resolve_config(tiny_config(tmp_path, **{field: None}))


SCHEDULE = dict(ddpm_num_steps=100, ddpm_beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


def test_noise_scheduler_is_the_one_diffusers_script_builds(tmp_path):
    # train_unconditional.py: DDPMScheduler(num_train_timesteps, beta_schedule, prediction_type) -- what the
    # exported pipeline's scheduler_config.json holds and what previews and `sample --checkpoint` step with.
    config = resolve_config(tiny_config(tmp_path, **SCHEDULE))
    ours = noise_scheduler_for(config)
    ref = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    assert ours.config == {k: ref.config[k] for k in ours.config}
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)


def test_preview_scheduler_is_the_training_schedule_or_ddim_over_it(tmp_path):
    config = resolve_config(tiny_config(tmp_path, sample_scheduler="ddpm", **SCHEDULE))
    noise_scheduler = noise_scheduler_for(config)
    assert preview_scheduler_for(config, noise_scheduler) is noise_scheduler
    config = resolve_config(tiny_config(tmp_path, sample_scheduler="ddim", **SCHEDULE))
    ddim = preview_scheduler_for(config, noise_scheduler)
    ref = DDIMScheduler.from_config(
        DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction").config
    )
    assert isinstance(ddim, FlaxDDIMScheduler)
    assert ddim.config == {k: ref.config[k] for k in ddim.config}
    np.testing.assert_allclose(np.asarray(ddim.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
