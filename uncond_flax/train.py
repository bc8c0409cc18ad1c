"""The training loop: config -> data -> jitted step -> checkpoints, previews and diffusers exports, as
diffusers' train_unconditional.py runs it."""

from __future__ import annotations

import errno
import logging
import math
import sys
import time

import jax
import ml_collections

from uncond_flax import storage
from uncond_flax.checkpointing import CheckpointCorrupt, Preempted, PreemptionWatch, abstract_like, prepare
from uncond_flax.compile_cache import compile_or_load, enable_compile_cache, load_in_background
from uncond_flax.config import (
    ConfigError,
    noise_scheduler_for,
    preview_scheduler_for,
    resolve_config,
    storable,
)
from uncond_flax.data import BadImageError, build_train_loader
from uncond_flax.epoch_end import EpochEnd, first_epoch
from uncond_flax.errors import one_line
from uncond_flax.finite import all_finite
from uncond_flax.flops import mfu, step_flops
from uncond_flax.metrics import MetricWriter, StepLogger
from uncond_flax.optim import lr_schedule_for, make_optimizer
from uncond_flax.parallel import (
    join_cluster,
    is_main_process,
    make_mesh,
    num_batch_shards,
)
from uncond_flax.step import jit_train_step, make_train_step, state_from_leaves, step_program_inputs, step_seed
from uncond_flax.train_state import TrainState, create_train_state, train_state_layout

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run had to stop (non-finite steps, a full disk, a failed Hub push); the message is one line."""


def _write_failed(what: str, error: BaseException) -> TrainingError:
    """A failed write as one line; a full disk says what to do (orbax's tensorstore reports it as a ValueError)."""
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
        return TrainingError(
            f"no space left on the device while writing {what}; free space, then resume with "
            "--config.resume_from_checkpoint=latest (the checkpoints before it are intact)"
        )
    return TrainingError(f"could not write {what}: {one_line(error)}")


def train_and_evaluate(config: ml_collections.ConfigDict) -> TrainState:
    """Train as diffusers' train_unconditional.py does; returns the final TrainState.

    Raises ConfigError (before compiling anything) for a bad config, dataset or checkpoint, Preempted after a
    SIGTERM once the checkpoint at the current step has committed, and TrainingError when the run must stop.
    """
    run = loader = None
    hub_repo = None
    try:
        join_cluster(config)
        config = resolve_config(config)
        enable_compile_cache(config.compilation_cache_dir)  # a resume or a rerun loads its compiled programs
        # Every process, before anything compiles: a missing bucket or a read-only folder is one line now.
        config.output_dir = storage.check_writable(config.output_dir)
        mesh = make_mesh(config.fsdp)
        noise_scheduler = noise_scheduler_for(config)
        preview_scheduler = preview_scheduler_for(config, noise_scheduler)
        # Locks output_dir for this run, applies the overwrite/resume rules, picks the checkpoints to resume from.
        run = prepare(config)
        checkpointer = run.checkpointer
        loader = build_train_loader(config, mesh)
        if config.push_to_hub and is_main_process():
            from uncond_flax.hub import HubRepo

            hub_repo = HubRepo(config)
    except (ValueError, FileNotFoundError, ImportError) as e:
        if run is not None:
            run.close()
        if loader is not None:
            loader.close()
        raise ConfigError(one_line(e)) from e
    main = is_main_process()
    watch = PreemptionWatch(checkpointer)
    writer = step_log = None
    try:
        steps_per_epoch = loader.steps_per_epoch
        total_steps = config.max_train_steps or steps_per_epoch * config.num_epochs
        num_epochs = math.ceil(total_steps / steps_per_epoch)
        images_per_step = loader.examples_per_step
        tx = make_optimizer(config, total_steps)
        layout = train_state_layout(config, mesh, tx)
        train_graphdef, eval_graphdef, abstract, shardings, _ = layout
        step_fn = make_train_step(
            train_graphdef,
            tx=tx,
            lr_fn=lr_schedule_for(config, total_steps),
            noise_scheduler=noise_scheduler,
            config=config,
        )
        train_step, images_sharding = jit_train_step(step_fn, shardings, mesh)
        # The step takes and returns the state's leaves (jit_train_step: far less host time per call).
        seed = step_seed(config.seed, mesh)
        step_args = (jax.tree.leaves(abstract_like(abstract, shardings)), loader.batch_spec(images_sharding), seed)
        step_program = {
            "name": "train_step",
            "shardings": (jax.tree.leaves(shardings), images_sharding),
            "inputs": step_program_inputs(config, total_steps),
        }
        # A second start of the same run loads the step compiled by the first, untraced (when the cache is on),
        # while this thread creates or restores the state.
        loading = load_in_background(args=step_args, **step_program)
        if not run.resuming:
            _, _, state, _ = create_train_state(config, mesh, tx, layout)
        else:
            try:  # the newest candidate that verifies (`latest` skips damaged ones, saying so)
                resume_step, state, data_state = run.restore(abstract_like(abstract, shardings))
            except CheckpointCorrupt as e:
                raise ConfigError(one_line(e)) from e
            source = run.source
            try:
                loader.set_state(data_state)
            except ValueError as e:
                raise ConfigError(
                    f"checkpoint {resume_step} in {source.directory}: {one_line(e)}; resume with the same seed, "
                    "dataset and global batch (train_batch_size x devices, gradient_accumulation_steps), "
                    "or start fresh"
                ) from e
            if not bool(jax.jit(all_finite)((state.params, state.opt_state, state.ema_params))):
                raise ConfigError(
                    f"checkpoint {resume_step} in {source.directory} holds NaN or inf in its weights or optimizer "
                    "state; resume from an earlier step (--config.resume_from_checkpoint=STEP)"
                )
            logger.info("resumed from checkpoint %d in %s", resume_step, source.directory)
        # A fresh state is at step 0: reading it would wait for the init program, which a CPU instead runs
        # while this thread traces the train step (or waits for the kept one to load).
        step = int(state.step) if run.resuming else 0
        if main:
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
            config.logger,
            storage.join(config.output_dir, config.logging_dir),
            storable(config),
            enabled=main,
            start_step=step,
        )
        step_log = StepLogger(
            writer,
            images_per_step=images_per_step,
            total_steps=total_steps,
            every=config.log_every,
            max_consecutive_skips=config.max_consecutive_skips,
            use_ema=config.use_ema,
            enabled=main,
        )
        epoch_end = EpochEnd(
            config,
            mesh=mesh,
            eval_graphdef=eval_graphdef,
            noise_scheduler=noise_scheduler,
            preview_scheduler=preview_scheduler,
            writer=writer,
            hub_repo=hub_repo,
            num_epochs=num_epochs,
            global_batch=images_per_step,
        )

        def current_state() -> TrainState:
            """The TrainState of the step's latest leaves (before the first step: the fresh or restored state)."""
            return state if leaves is None else state_from_leaves(shardings, leaves)

        leaves: list[jax.Array] | None = None

        def save_checkpoint(at_step: int, wait: bool = False) -> None:
            step_log.drain()  # a run that must stop for non-finite steps stops before saving
            with step_log.paused():
                # A staged (gs://) log folder is uploaded with each checkpoint: a crash after it then loses no step
                # that a resume from it will not replay (the bucket's metrics.jsonl would otherwise have a gap).
                writer.flush(upload=True)
                try:  # a save first waits for the previous one, and re-raises its error
                    if at_step not in checkpointer.all_steps():
                        checkpointer.save(at_step, current_state(), loader.get_state(), storable(config))
                    if wait:
                        checkpointer.wait()
                except (OSError, ValueError, RuntimeError) as e:
                    raise _write_failed(f"a checkpoint in {checkpointer.directory}", e) from e

        def stop_if_preempted(at_step: int) -> None:
            if watch.should_stop(at_step):
                save_checkpoint(at_step, wait=True)
                raise Preempted(at_step, checkpointer.directory)

        stop_if_preempted(step)  # a SIGTERM while starting: nothing compiled yet, stop at once
        started = time.perf_counter()
        train_step, facts, _ = compile_or_load(
            train_step,
            step_args,
            loading=loading,
            # per device: the convolutions and matrix products
            info=lambda traced: {"flops": step_flops(traced, jax.device_count())},
            **step_program,
        )
        flops = facts.get("flops")
        logger.info(
            "train step compiled in %.1f s%s",
            time.perf_counter() - started,
            f"; {flops:.3g} FLOPs per step per device" if flops else "",
        )
        step_log.mfu_of = lambda seconds: mfu(flops, seconds, jax.devices(), config.mixed_precision)
        step_log.start(step)
        leaves = jax.tree.leaves(state)  # the step's form of the state, donated at every step (current_state())
        state = None
        for epoch in range(first_epoch(step, steps_per_epoch), num_epochs):
            epoch_stop = min((epoch + 1) * steps_per_epoch, total_steps)
            while step < epoch_stop:
                leaves, metrics = train_step(leaves, next(loader)["images"], seed)
                step += 1
                step_log.push(step, metrics)
                if config.checkpointing_steps and step % config.checkpointing_steps == 0:
                    save_checkpoint(step)
                stop_if_preempted(step)
            step_log.drain()
            with step_log.paused():
                epoch_end(epoch, step, current_state())
        try:
            checkpointer.wait()
        except (OSError, ValueError, RuntimeError) as e:
            raise _write_failed(f"a checkpoint in {checkpointer.directory}", e) from e
        if epoch_end.failed_push:
            raise TrainingError(f"push_to_hub: the last upload to {hub_repo.repo_id} failed (see the log above)")
        return current_state()
    except OSError as e:
        full = e.errno == errno.ENOSPC
        raise (_write_failed(e.filename or "the run's outputs", e) if full else TrainingError(one_line(e))) from e
    except (FloatingPointError, BadImageError) as e:
        raise TrainingError(one_line(e)) from e
    finally:
        failing = sys.exc_info()[1] is not None
        closers = [step_log and step_log.close, writer and writer.close, watch.close, run.close, loader.close]
        for close in filter(None, closers):
            try:
                close()
            except Exception as e:  # noqa: BLE001 -- an error already on its way out stays the one reported
                if not failing:
                    raise _write_failed("the run's outputs", e) from e
                logger.warning("while stopping: %s", one_line(e))
