"""The training loop: config -> data -> jitted step -> previews / diffusers export, like train_unconditional.py."""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from uncond_flax import hub
from uncond_flax.checkpointing import (
    Checkpointer,
    Preempted,
    PreemptionWatch,
    abstract_like,
    checkpoint_dir,
    incompatible_keys,
    resolve_resume,
)
from uncond_flax.data import build_train_loader, check_resolution
from uncond_flax.export import load_unet, load_unet_config, save_pipeline
from uncond_flax.images import save_grid
from uncond_flax.metrics import MetricWriter, check_logger
from uncond_flax.models import FlaxUNet2DModel, resolve_unet_config
from uncond_flax.optim import lr_schedule_for, make_loss_scale, make_optimizer
from uncond_flax.parallel import (
    batch_sharding,
    initialize_distributed,
    is_main_process,
    make_mesh,
    num_batch_shards,
    replicated,
    state_shardings,
    to_host,
)
from uncond_flax.sampling import sample_images
from uncond_flax.schedulers import FlaxDDIMScheduler, FlaxDDPMScheduler
from uncond_flax.step import PREDICTION_TYPES, make_train_step
from uncond_flax.train_state import TrainState

logger = logging.getLogger(__name__)

COMPUTE_DTYPES = {"no": jnp.float32, "fp16": jnp.float16, "bf16": jnp.bfloat16}
SAMPLE_SCHEDULERS = ("ddpm", "ddim")


class ConfigError(ValueError):
    """A bad config, dataset or path, found before anything compiles; the message is one line."""


def _check_choice(config: Any, key: str, choices) -> None:
    if config[key] not in choices:
        raise ValueError(f"{key}={config[key]!r} is not supported; choose one of {list(choices)}")


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A checked copy whose `model` holds the full UNet2DModel config; every error here comes before compiling.

    The model comes from `init_from` (weights too), else `model_config_name_or_path`, else `config.model`
    with `sample_size = resolution`, as diffusers' trainer builds it.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    _check_choice(config, "mixed_precision", COMPUTE_DTYPES)
    _check_choice(config, "prediction_type", PREDICTION_TYPES)
    _check_choice(config, "sample_scheduler", SAMPLE_SCHEDULERS)
    check_logger(config.logger)
    lr_schedule_for(config, 1)
    for key in (
        "train_batch_size",
        "eval_batch_size",
        "gradient_accumulation_steps",
        "num_epochs",
        "save_images_epochs",
        "save_model_epochs",
        "ddpm_num_steps",
        "ddpm_num_inference_steps",
    ):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ValueError(f"{key}={config[key]!r} must be a positive integer")
    if config.max_train_steps is not None and config.max_train_steps < 1:
        raise ValueError(f"max_train_steps={config.max_train_steps} must be >= 1 (or None for num_epochs)")
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
    config.model = ml_collections.ConfigDict({k: list(v) if isinstance(v, tuple) else v for k, v in unet.items()})
    check_resolution(config.resolution, config.model.block_out_channels)
    return config


def noise_scheduler_for(config: Any) -> FlaxDDPMScheduler:
    """The training noise schedule, as diffusers' trainer builds its DDPMScheduler."""
    return FlaxDDPMScheduler.create(
        num_train_timesteps=config.ddpm_num_steps,
        beta_schedule=config.ddpm_beta_schedule,
        prediction_type=config.prediction_type,
    )


def preview_scheduler_for(config: Any, noise_scheduler: FlaxDDPMScheduler):
    if config.sample_scheduler == "ddim":
        ddim = {k: v for k, v in noise_scheduler.to_config().items() if k != "variance_type"}
        return FlaxDDIMScheduler.from_config(ddim)
    return noise_scheduler


def _unet_kwargs(config: Any) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.to_dict().items()}


def build_model(config: Any, dtype=jnp.float32, seed: int | None = None) -> FlaxUNet2DModel:
    rngs = nnx.Rngs(config.seed if seed is None else seed)
    return FlaxUNet2DModel(**_unet_kwargs(config), dtype=dtype, rngs=rngs)


def train_state_layout(config: Any, mesh, tx) -> tuple[nnx.GraphDef, nnx.GraphDef, TrainState, Any, Any]:
    """(train graphdef, float32 graphdef, abstract TrainState, its shardings on `mesh`, init function).

    Nothing is computed or compiled: a restore needs only this.
    """
    compute_dtype = COMPUTE_DTYPES[config.mixed_precision]
    # Module construction is slow in Python: build each abstract model once (they differ only in dtype).
    eval_graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: build_model(config)), nnx.Param, ...)
    train_graphdef = eval_graphdef
    if compute_dtype != jnp.float32:
        train_graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: build_model(config, compute_dtype)), nnx.Param, ...)
    loss_scale = make_loss_scale(config.mixed_precision)

    def init(params=None, buffers=None):
        if params is None:
            _, params, buffers = nnx.split(build_model(config), nnx.Param, ...)
        return TrainState.create(params, buffers, tx, use_ema=config.use_ema, loss_scale=loss_scale)

    abstract = jax.eval_shape(init)
    return train_graphdef, eval_graphdef, abstract, state_shardings(abstract, mesh), init


def create_train_state(config: Any, mesh, tx) -> tuple[nnx.GraphDef, nnx.GraphDef, TrainState, Any]:
    """(train graphdef, float32 graphdef, sharded TrainState, its shardings), initialised directly on the mesh
    (random weights, or `init_from`'s)."""
    train_graphdef, eval_graphdef, _, shardings, init = train_state_layout(config, mesh, tx)
    if config.init_from:
        _, params, buffers = nnx.split(load_unet(config.init_from), nnx.Param, ...)
        state = jax.jit(init, out_shardings=shardings)(params, buffers)
    else:
        state = jax.jit(init, out_shardings=shardings)()
    return train_graphdef, eval_graphdef, state, shardings


def inference_model(eval_graphdef: nnx.GraphDef, state: TrainState) -> FlaxUNet2DModel:
    """A float32 model holding the EMA weights (raw weights without EMA), still on the devices."""
    return nnx.merge(eval_graphdef, state.inference_params(), state.buffers)


def export_pipeline(config: Any, eval_graphdef: nnx.GraphDef, state: TrainState, noise_scheduler) -> None:
    """Write the diffusers DDPMPipeline folder into output_dir (every process gathers, process 0 writes)."""
    params, buffers = to_host((state.inference_params(), state.buffers))
    if not all(np.isfinite(x).all() for x in jax.tree.leaves(params)):
        raise FloatingPointError("refusing to export: the model weights contain NaN or inf")
    if is_main_process():
        save_pipeline(config.output_dir, nnx.merge(eval_graphdef, params, buffers), noise_scheduler)


class _StepLog:
    """Fetches a step's metrics one step late, so the host never waits on the step it just dispatched."""

    def __init__(self, writer: MetricWriter, images_per_step: int, config: Any):
        self.writer, self.images_per_step, self.config = writer, images_per_step, config
        self.pending: tuple[int, Any] | None = None
        self.last_time = time.perf_counter()
        self.last: dict[str, float] = {}

    def push(self, step: int, metrics: Any, bar) -> None:
        self.drain(bar)
        self.pending = (step, metrics)

    def drain(self, bar=None) -> None:
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        values["img/s"] = self.images_per_step / max(now - self.last_time, 1e-9)
        self.last_time = now
        consecutive = int(values.pop("consecutive_skips"))
        if not self.config.use_ema:
            values.pop("ema_decay")
        self.writer.scalars(step, values)
        self.last = values
        if bar is not None:
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", img_s=f"{values['img/s']:.0f}")
        if consecutive >= self.config.max_consecutive_skips:
            raise FloatingPointError(
                f"{consecutive} consecutive steps had a non-finite loss or gradients (step {step}, loss "
                f"{values['loss']}); stopping. Try a lower learning_rate or mixed_precision='bf16'."
            )


def _resume_step(config: Any, source: Checkpointer | None, step: int | str | None) -> int | None:
    """The checkpoint step to resume from (None: start fresh), checked against this config before compiling.

    `step` is a step number or "latest", as `resolve_resume` gives it.
    """
    if source is None:
        return None
    if step == "latest":
        step = source.latest_step()
        if step is None:
            logger.info("resume_from_checkpoint=latest: no checkpoint in %s, starting fresh", source.directory)
            return None
    elif step not in source.all_steps():
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {source.directory} (found {source.all_steps() or 'none'})"
        )
    diffs = incompatible_keys(source.read_config(step), config.to_dict())
    if diffs:
        raise ValueError(
            f"checkpoint {step} in {source.directory} was trained with a different model or "
            f"training setup: {', '.join(diffs)} differ"
        )
    return step


def train_and_evaluate(config: ml_collections.ConfigDict) -> TrainState:
    """Train as diffusers' train_unconditional.py does; returns the final TrainState.

    Raises ConfigError (before compiling anything) for a bad config or dataset, and Preempted after a SIGTERM
    once the checkpoint at the current step has committed.
    """
    initialize_distributed(config.distributed, config.coordinator_address, config.num_processes, config.process_id)
    checkpointer = source = None
    try:
        config = resolve_config(config)
        mesh = make_mesh(config.fsdp)
        noise_scheduler = noise_scheduler_for(config)
        preview_scheduler = preview_scheduler_for(config, noise_scheduler)
        checkpointer = Checkpointer(checkpoint_dir(config), max_to_keep=config.checkpoints_total_limit)
        resume_dir, resume_at = resolve_resume(config.resume_from_checkpoint, checkpointer.directory)
        if resume_at is not None:
            source = checkpointer if resume_dir == checkpointer.directory else Checkpointer(resume_dir, read_only=True)
        resume_step = _resume_step(config, source, resume_at)
        loader = build_train_loader(config, mesh)
    except (ValueError, FileNotFoundError, ImportError) as e:
        for c in {checkpointer, source} - {None}:
            c.close()
        raise ConfigError(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    main = is_main_process()
    watch = PreemptionWatch(checkpointer)
    writer = None
    try:
        steps_per_epoch = loader.steps_per_epoch
        total_steps = config.max_train_steps or steps_per_epoch * config.num_epochs
        num_epochs = math.ceil(total_steps / steps_per_epoch)
        images_per_step = loader.examples_per_step
        tx = make_optimizer(config, total_steps)
        lr_fn = lr_schedule_for(config, total_steps)
        if resume_step is None:
            train_graphdef, eval_graphdef, state, shardings = create_train_state(config, mesh, tx)
        else:
            train_graphdef, eval_graphdef, abstract, shardings, _ = train_state_layout(config, mesh, tx)
            state, data_state = source.restore(resume_step, abstract_like(abstract, shardings))
            loader.set_state(data_state)
            logger.info("resumed from checkpoint %d in %s", resume_step, source.directory)
        step_fn = make_train_step(train_graphdef, tx=tx, lr_fn=lr_fn, noise_scheduler=noise_scheduler, config=config)
        images_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *batch_sharding(mesh).spec))
        train_step = jax.jit(
            step_fn,
            in_shardings=(shardings, images_sharding),
            out_shardings=(shardings, replicated(mesh)),
            donate_argnums=0,
        )

        if main:
            os.makedirs(config.output_dir, exist_ok=True)
            logger.info(
                "%d examples, %d steps/epoch, %d epochs, %d optimizer steps, global batch %d x %d accum, %d devices",
                loader.num_examples,
                steps_per_epoch,
                num_epochs,
                total_steps,
                images_per_step // config.gradient_accumulation_steps,
                config.gradient_accumulation_steps,
                num_batch_shards(mesh),
            )
        writer = MetricWriter(
            config.logger, os.path.join(config.output_dir, config.logging_dir), config.to_dict(), enabled=main
        )
        log = _StepLog(writer, images_per_step, config)

        def save_checkpoint(at_step: int) -> None:
            if at_step not in checkpointer.all_steps():
                checkpointer.save(at_step, state, loader.get_state(), config.to_dict())

        step = int(state.step)
        for epoch in range(step // steps_per_epoch, num_epochs):
            in_epoch = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
            bar = tqdm(total=in_epoch, initial=step - epoch * steps_per_epoch, desc=f"Epoch {epoch}", disable=not main)
            with bar:
                while step < epoch * steps_per_epoch + in_epoch:
                    batch = next(loader)
                    state, metrics = train_step(state, batch["images"])
                    step += 1
                    log.push(step, metrics, bar)
                    bar.update(1)
                    if config.checkpointing_steps and step % config.checkpointing_steps == 0:
                        log.drain(bar)  # a run that must stop for non-finite steps stops before saving
                        save_checkpoint(step)
                    if watch.should_stop(step):
                        log.drain(bar)
                        save_checkpoint(step)
                        checkpointer.wait()
                        bar.close()
                        raise Preempted(step, checkpointer.directory)
                log.drain(bar)

            last = epoch == num_epochs - 1
            if epoch % config.save_images_epochs == 0 or last:
                steps = config.sample_num_inference_steps or config.ddpm_num_inference_steps
                images = sample_images(
                    inference_model(eval_graphdef, state),
                    preview_scheduler,
                    batch_size=config.eval_batch_size,
                    num_inference_steps=steps,
                    key=jax.random.key(config.seed),
                    mesh=mesh,
                )
                if main:
                    save_grid(images, os.path.join(config.output_dir, "samples", f"epoch_{epoch:04d}.png"))
                    writer.images(step, "test_samples", images)
            if epoch % config.save_model_epochs == 0 or last:
                export_pipeline(config, eval_graphdef, state, noise_scheduler)
                if main and config.push_to_hub:
                    hub.write_model_card(config.output_dir, config, steps=step, global_batch=images_per_step)
                    hub.push_to_hub(config.output_dir, config, commit_message=f"Epoch {epoch}")
            writer.flush()
        return state
    finally:
        if writer is not None:
            writer.close()
        watch.close()
        for c in {checkpointer, source} - {None}:
            c.close()
        loader.close()
