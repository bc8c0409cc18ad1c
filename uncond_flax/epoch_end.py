"""What happens at the end of an epoch (preview grid, diffusers export, Hub push), as its own resumable step.

Checkpoints are written inside the step loop, before the epoch's end work runs, so a checkpoint taken on an
epoch's last step always means "that epoch's end work has not happened yet". A run resumed from it therefore
starts in the finished epoch, runs no step there, and does the end work: the outputs equal an uninterrupted
run's (the previews and exports are deterministic functions of the state and the seed).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from uncond_flax import storage
from uncond_flax.export import save_pipeline
from uncond_flax.images import save_grid
from uncond_flax.parallel import is_main_process, to_host
from uncond_flax.rng import purpose_key
from uncond_flax.sampling import sample_images
from uncond_flax.train_state import TrainState, inference_model


def first_epoch(step: int, steps_per_epoch: int) -> int:
    """The epoch a run at `step` (steps done) continues: the one holding step `step - 1`, whose end work may be
    outstanding; epoch 0 for a fresh run."""
    return (step - 1) // steps_per_epoch if step > 0 else 0


def export_pipeline(config: Any, eval_graphdef: nnx.GraphDef, state: TrainState, noise_scheduler: Any) -> None:
    """Write the diffusers DDPMPipeline folder into output_dir (every process gathers, process 0 writes)."""
    params, buffers = to_host((state.inference_params(), state.buffers))
    if not all(np.isfinite(x).all() for x in jax.tree.leaves(params)):
        raise FloatingPointError("refusing to export: the model weights contain NaN or inf")
    if is_main_process():
        save_pipeline(config.output_dir, nnx.merge(eval_graphdef, params, buffers), noise_scheduler)


class EpochEnd:
    """The end-of-epoch work of diffusers' trainer: sample grid every `save_images_epochs`, pipeline export (and
    Hub push) every `save_model_epochs`, both also after the last epoch."""

    def __init__(
        self,
        config: Any,
        *,
        mesh,
        eval_graphdef,
        noise_scheduler,
        preview_scheduler,
        writer,
        hub_repo,
        num_epochs: int,
        global_batch: int,
    ):
        self.config, self.mesh, self.eval_graphdef = config, mesh, eval_graphdef
        self.noise_scheduler, self.preview_scheduler = noise_scheduler, preview_scheduler
        self.writer, self.hub_repo = writer, hub_repo
        self.num_epochs, self.global_batch = num_epochs, global_batch
        self.failed_push = False

    def __call__(self, epoch: int, step: int, state: TrainState) -> None:
        config, main = self.config, is_main_process()
        last = epoch == self.num_epochs - 1
        if epoch % config.save_images_epochs == 0 or last:
            images = sample_images(
                inference_model(self.eval_graphdef, state),
                self.preview_scheduler,
                batch_size=config.eval_batch_size,
                num_inference_steps=config.sample_num_inference_steps or config.ddpm_num_inference_steps,
                key=purpose_key(config.seed, "preview"),
                mesh=self.mesh,
            )
            if main:
                save_grid(images, storage.join(config.output_dir, "samples", f"epoch_{epoch:04d}.png"))
                self.writer.images(step, "test_samples", images)
        if epoch % config.save_model_epochs == 0 or last:
            export_pipeline(config, self.eval_graphdef, state, self.noise_scheduler)
            if main and self.hub_repo is not None:
                from uncond_flax.hub import write_model_card

                write_model_card(
                    config.output_dir, config, self.hub_repo.repo_id, steps=step, global_batch=self.global_batch
                )
                self.failed_push = not self.hub_repo.push(config.output_dir, commit_message=f"Epoch {epoch}")
        self.writer.flush()
