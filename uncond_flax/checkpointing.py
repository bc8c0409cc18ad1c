"""Orbax checkpoints of the whole run (TrainState, data position, config) and preemption handling.

A checkpoint is `<output_dir>/checkpoints/<step>/` with items `state` (every array a global jax.Array),
`data` (the loader position, JSON) and `config` (JSON). Saves are asynchronous; orbax writes into a
temporary directory and renames it on commit, so a process killed mid-save leaves the previous checkpoint
intact, and the leftover temporary directory is removed on the next start.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

from uncond_flax.optim import all_finite

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" — a scheduler should requeue the job
# Keys that define the model and the TrainState's structure; everything else may change on resume.
ARCHITECTURE_KEYS = ("model", "use_ema", "mixed_precision", "prediction_type", "ddpm_num_steps", "ddpm_beta_schedule")


class Preempted(Exception):
    """Raised after a SIGTERM: the checkpoint at `step` is committed and the run should exit."""

    def __init__(self, step: int, directory: str):
        super().__init__(
            f"preempted: checkpoint at step {step} saved in {directory}; "
            f"resume with --config.resume_from_checkpoint=latest"
        )
        self.step = step


def checkpoint_dir(config: Any) -> str:
    return os.path.abspath(os.path.join(config.output_dir, "checkpoints"))


def _is_step_dir(path: str) -> bool:
    return os.path.basename(os.path.normpath(path)).isdigit() and os.path.isdir(os.path.join(path, "state"))


def resolve_resume(value: str | int | None, directory: str) -> tuple[str, int | str | None]:
    """(checkpoints directory, step or "latest" or None) for `resume_from_checkpoint`.

    Accepts None, "latest", a step number, diffusers' "checkpoint-1500", a step directory, or a checkpoints
    directory (its latest step).
    """
    if value is None or value == "":
        return directory, None
    text = str(value)
    if text == "latest":
        return directory, "latest"
    match = re.fullmatch(r"(?:checkpoint[-_])?(\d+)", text)
    if match:
        return directory, int(match.group(1))
    if _is_step_dir(text):
        return os.path.dirname(os.path.abspath(os.path.normpath(text))), int(os.path.basename(os.path.normpath(text)))
    if os.path.isdir(text):
        return os.path.abspath(text), "latest"
    raise ValueError(
        f"resume_from_checkpoint={value!r}: not 'latest', a step number, 'checkpoint-N', or an "
        f"existing checkpoint directory"
    )


def incompatible_keys(saved: dict, current: dict) -> list[str]:
    """The architecture keys (dotted, e.g. `model.block_out_channels`) whose values differ."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            return {k2: v2 for k, v in d.items() for k2, v2 in flat(v, f"{prefix}{k}.").items()}
        return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}

    diffs = []
    for key in ARCHITECTURE_KEYS:
        a, b = flat(saved.get(key), f"{key}."), flat(current.get(key), f"{key}.")
        diffs += sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return diffs


# One compiled reduction over the whole tree (not one tiny program per leaf shape).
_all_finite_jit = jax.jit(all_finite)


class Checkpointer:
    """One orbax CheckpointManager for the run; every process must create it and call save/restore together.

    `read_only` opens another run's checkpoints (to resume from or export) without touching them.
    """

    def __init__(self, directory: str, max_to_keep: int | None = None, read_only: bool = False):
        # Replica-parallel saving splits each replicated array across devices with a jitted slice per array
        # shape: seconds of compiling on the first save for a small D2H speed-up. Saving from one replica is
        # simpler and, for UNet-sized states, as fast. (This sets orbax's process-wide jax.Array handler.)
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
        )
        self.directory = directory
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            # A save killed mid-write leaves a *.orbax-checkpoint-tmp-* dir; only the run that owns the
            # directory removes it (a reader could be looking at a run still saving).
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
            enable_async_checkpointing=True,
        )
        self.manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        """Start an async save (after the previous save has committed; orbax waits for it and re-raises its
        errors). Refuses, with FloatingPointError, to write non-finite weights."""
        if not bool(_all_finite_jit((state.params, state.ema_params))):
            raise FloatingPointError(f"refusing to checkpoint step {step}: the weights contain NaN or inf")
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def read_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state placed as `abstract_state`'s shardings say, data position): any device count can restore."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, restored.data

    def reached_preemption(self, step: int) -> bool:
        """JAX's multi-host preemption sync point (all processes agree on the step); False in one process."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        # orbax 0.12 starts removing stale tmp dirs in a thread when the manager is created, and close() does
        # not wait for it: a process that exits right after (a config error) dies with that thread's traceback.
        await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
        self.manager.close()


def abstract_like(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings: what a restore fills in."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


class PreemptionWatch:
    """Did this run get a SIGTERM? In one process our own handler answers; with several, JAX's sync point.

    A Python SIGTERM handler would replace the one JAX's preemption service installs at
    `jax.distributed.initialize`, so with several processes none is installed.
    """

    def __init__(self, checkpointer: Checkpointer):
        self._checkpointer = checkpointer
        self._event = threading.Event()
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        logger.warning("SIGTERM: finishing the current step, then saving a checkpoint")
        self._event.set()

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self._checkpointer.reached_preemption(step)
        return self._event.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
