"""Orbax checkpoints of the whole run (TrainState, data position, config) and preemption handling.

A checkpoint is `<output_dir>/checkpoints/<step>/` with items `state` (every array a global jax.Array),
`data` (the loader position, JSON), `config` (JSON) and `integrity` (checksums of the other three, JSON).
Saves are asynchronous; orbax writes into a temporary directory and renames it on commit, so a process killed
mid-save leaves the previous checkpoint intact, and the leftover temporary directory is removed on the next start.

`prepare` is how a run starts: it locks output_dir for this run (`run_lock`), applies the rules for a used
output_dir (a fresh start needs `overwrite_output_dir`; resuming an older step moves the newer ones aside), and
picks the checkpoints to resume from; `RunCheckpoints.restore` then restores the newest one that verifies.

With several processes, every choice that depends on what storage holds (the steps there, which to resume, whether
one is complete, compatible and intact) is made by process 0 and sent to the others (`process_0_decides`): hosts
never decide from what they each happen to see. A local output_dir must be one that all hosts see.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from uncond_flax import storage
from uncond_flax.finite import all_finite
from uncond_flax.parallel import check_shared_dir, first_failure, process_0_decides
from uncond_flax.run_lock import RunLock, lock_store_for

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" — a scheduler should requeue the job
# Keys that define the model and the TrainState's structure; everything else may change on resume.
ARCHITECTURE_KEYS = ("model", "use_ema", "mixed_precision", "prediction_type", "ddpm_num_steps", "ddpm_beta_schedule")
ITEMS = ("state", "data", "config", "integrity")
# The file orbax writes last into each item: a checkpoint without one of them was never completely written.
ITEM_METADATA = {
    "state": "_METADATA",
    "data": "metadata",
    "config": "metadata",
    "integrity": "metadata",
}
# orbax writes this into the step and each item as the last act of a save, before the rename (or, on object
# stores, instead of it): "committed".
COMMIT_FILE = "commit_success.txt"
ABANDONED_PREFIX = "abandoned-"


class CheckpointCorrupt(ValueError):
    """A checkpoint that is incomplete or differs from what was saved; the message is one line naming it."""


class Preempted(Exception):
    """Raised after a SIGTERM: the checkpoint at `step` is committed and the run should exit."""

    def __init__(self, step: int, directory: str):
        super().__init__(
            f"preempted: checkpoint at step {step} saved in {directory}; "
            f"resume with --config.resume_from_checkpoint=latest"
        )
        self.step = step


def checkpoint_dir(config: Any) -> str:
    """`<output_dir>/checkpoints`, absolute (a URL stays a URL)."""
    return storage.abspath(storage.join(config.output_dir, "checkpoints"))


def _is_step_dir(path: str) -> bool:
    return storage.basename(path).isdigit() and storage.isdir(storage.join(path, "state"))


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
        return storage.dirname(text), int(storage.basename(text))
    if storage.isdir(text):
        return storage.abspath(text), "latest"
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


def _checksum(x: jax.Array) -> jax.Array:
    """Σ w·(2i+1) mod 2^32 over an array's 32-bit (or narrower) words w at flat positions i. Integer sums wrap, so
    any device layout gives the same result, and any change within one word changes it (a nonzero multiple of
    2^k, k < 32, times an odd number is nonzero mod 2^32). One fused pass: about two finite checks' time on CPU."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    elif x.dtype.itemsize >= 4:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte types gain a trailing axis of 2
    else:
        words = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]).astype(jnp.uint32)
    # The flat position from per-axis iotas: no reshape, so a sharded array is not moved between devices.
    position, stride = jnp.zeros(words.shape, jnp.uint32), 1
    for axis in reversed(range(words.ndim)):
        position = position + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    return jnp.sum(words * (2 * position + 1), dtype=jnp.uint32)


# One compiled program per state layout (not one per leaf shape); every process runs it on its shards.
@jax.jit
def _save_checks(state: Any) -> tuple[jax.Array, Any]:
    return all_finite((state.params, state.ema_params)), jax.tree.map(_checksum, state)


_checksums = jax.jit(lambda state: jax.tree.map(_checksum, state))


def _named_sums(sums: Any) -> dict[str, list[int]]:
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(sums))[0]
    return {jax.tree_util.keystr(path): int(value) for path, value in leaves}


def _digest(item: Any) -> str:
    return hashlib.sha256(json.dumps(item, sort_keys=True).encode()).hexdigest()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _sync(name: str) -> None:
    """All processes wait here (after process 0 changed files the others are about to read)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


_ARRAY_HANDLER_SET = False


def _use_single_replica_array_handler() -> None:
    """Once per process, without orbax's warning that a handler is being replaced (that replacement is the point)."""
    global _ARRAY_HANDLER_SET
    if _ARRAY_HANDLER_SET:
        return
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
        )
    finally:
        absl_logger.setLevel(level)
    _ARRAY_HANDLER_SET = True


class Checkpointer:
    """One orbax CheckpointManager for the run; every process must create it and call save/restore together.

    `read_only` opens another run's checkpoints (to resume from or export) without touching them. `restore`
    verifies what it reads and raises CheckpointCorrupt for a damaged checkpoint.
    """

    def __init__(self, directory: str, max_to_keep: int | None = None, read_only: bool = False):
        # Replica-parallel saving splits each replicated array across devices with a jitted slice per array
        # shape: seconds of compiling on the first save for a small D2H speed-up. Saving from one replica is
        # simpler and, for UNet-sized states, as fast. (This sets orbax's process-wide jax.Array handler.)
        _use_single_replica_array_handler()
        self.directory = storage.abspath(directory)
        self.read_only = read_only
        self.lock: RunLock | None = None  # set by `prepare`: saving stops if another run took it over
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            # A save killed mid-write leaves a *.orbax-checkpoint-tmp-* dir; only the run that owns the
            # directory removes it (a reader could be looking at a run still saving).
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
            enable_async_checkpointing=True,
            # With several processes, process 0 lists the steps and sends the list to the others (at creation and
            # each reload): `all_steps` and `latest_step` are the same everywhere. Ignored by a single process.
            single_host_load_and_broadcast=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest step on disk, verified or not (`RunCheckpoints.restore` falls back past damaged ones)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> str:
        return storage.join(self.directory, str(step))

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        """Start an async save (after the previous save has committed; orbax waits for it and re-raises its
        errors). Refuses, with FloatingPointError, to write non-finite weights."""
        if self.lock is not None and self.lock.lost:
            raise RuntimeError(f"not saving step {step}: another run took over {self.lock.store.location}")
        newer = [s for s in self.all_steps() if s > step]
        if newer:  # retention keeps the newest steps: it would delete this one at once
            raise ValueError(f"refusing to checkpoint step {step}: {self.directory} holds newer steps {newer}")
        finite, sums = _save_checks(state)
        if not bool(finite):
            raise FloatingPointError(f"refusing to checkpoint step {step}: the weights contain NaN or inf")
        integrity = {
            "arrays": _named_sums(sums),
            "data": _digest(data_state),
            "config": _digest(config),
        }
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
                integrity=ocp.args.JsonSave(integrity),
            ),
            force=True,
        )

    def problem(self, step: int) -> str | None:
        """Why checkpoint `step` is incomplete (the first missing file), or None; reads no arrays (process 0's view
        with several processes)."""
        return process_0_decides(lambda: self._problem(step))

    def _problem(self, step: int) -> str | None:
        step_dir = self.step_dir(step)
        needed = [storage.join(step_dir, COMMIT_FILE)]
        for item in ITEMS:
            if item == "integrity" and not storage.exists(storage.join(step_dir, item)):
                continue  # written by an older version: restore says it cannot verify
            needed += [
                storage.join(step_dir, item, ITEM_METADATA[item]),
                storage.join(step_dir, item, COMMIT_FILE),
            ]
        missing = next((path for path in needed if not storage.exists(path)), None)
        return f"{missing} is missing" if missing else None

    def _check_complete(self, step: int) -> None:
        problem = self.problem(step)
        if problem:
            raise CheckpointCorrupt(f"checkpoint {step} in {self.directory} is incomplete: {problem}")

    def _unreadable(self, step: int, error: Exception) -> CheckpointCorrupt:
        # orbax and tensorstore raise many types
        return CheckpointCorrupt(f"checkpoint {step} in {self.directory} cannot be read: {_first_line(error)}")

    def read_config(self, step: int) -> dict:
        """The run config saved with `step` (process 0 reads it; all processes get it). Raises CheckpointCorrupt."""

        def read() -> dict:
            self._check_complete(step)
            try:  # the item's handler alone: the manager's restore is a collective, and only process 0 reads
                return ocp.JsonCheckpointHandler().restore(storage.epath(storage.join(self.step_dir(step), "config")))
            except Exception as e:
                raise self._unreadable(step, e) from e

        return process_0_decides(read)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state placed as `abstract_state`'s shardings say, data position): any device count can restore.

        Raises CheckpointCorrupt if the checkpoint is incomplete or differs from the checksums saved with it.
        """
        self._check_complete(step)
        verify = process_0_decides(lambda: storage.exists(storage.join(self.step_dir(step), "integrity")))
        items = {
            "state": ocp.args.StandardRestore(abstract_state),
            "data": ocp.args.JsonRestore(),
        }
        if verify:
            items.update(config=ocp.args.JsonRestore(), integrity=ocp.args.JsonRestore())
        # Every process reads its shards; if any cannot, all skip this step together.
        restored = error = None
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            error = e
        failure = first_failure(None if error is None else str(self._unreadable(step, error)))
        if failure is not None:
            raise CheckpointCorrupt(failure) from error
        if not verify:
            logger.warning(
                "checkpoint %d in %s has no checksums (an older version wrote it)",
                step,
                self.directory,
            )
            return restored.state, process_0_decides(lambda: restored.data)
        sums = _named_sums(_checksums(restored.state))  # a collective: the same sums on every process

        def verdict() -> tuple[list[str], dict]:
            saved = restored.integrity
            damaged = sorted(k for k in set(sums) | set(saved["arrays"]) if sums.get(k) != saved["arrays"].get(k))
            return damaged + [k for k in ("data", "config") if _digest(getattr(restored, k)) != saved[k]], restored.data

        damaged, data = process_0_decides(verdict)  # process 0's reading of the checksums and data position
        if damaged:
            more = f" and {len(damaged) - 3} more" if len(damaged) > 3 else ""
            raise CheckpointCorrupt(
                f"checkpoint {step} in {self.directory} is damaged: the checksums saved with it do not match "
                f"{', '.join(damaged[:3])}{more}"
            )
        return restored.state, data

    def _move_steps(self, steps: list[int], destination: str | None) -> None:
        """Move the step folders into `destination` (None: delete them); process 0 acts, then all reload."""
        if jax.process_index() == 0:
            if destination is not None:
                storage.makedirs(destination)
            for step in steps:
                if destination is None:
                    storage.rmtree(self.step_dir(step))
                else:
                    storage.rename(self.step_dir(step), storage.join(destination, str(step)))
        _sync(f"uncond_flax.checkpointing.move_steps.{steps}")
        self.manager.reload()

    def remove(self, steps: list[int]) -> None:
        self._move_steps(steps, None)

    def set_aside(self, steps: list[int]) -> str:
        """Move the steps into `abandoned-<UTC time>/` next to them (kept, and invisible to resuming); its path."""
        destination = storage.join(
            self.directory,
            ABANDONED_PREFIX + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        )
        self._move_steps(steps, destination)
        return destination

    def reached_preemption(self, step: int) -> bool:
        """JAX's multi-host preemption sync point (all processes agree on the step); False in one process."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        # orbax 0.12 starts removing stale tmp dirs in a thread when the manager is created, and close() does
        # not wait for it: a process that exits right after (a config error) dies with that thread's traceback.
        # A private method: tests/test_checkpoint_safety.py fails if it moves.
        self.manager._maybe_await_cleanup_tmp_directory()
        self.manager.close()


def _check_compatible(source: Checkpointer, step: int, config: dict) -> None:
    diffs = incompatible_keys(source.read_config(step), config)
    if diffs:
        raise ValueError(
            f"checkpoint {step} in {source.directory} was trained with a different model or "
            f"training setup: {', '.join(diffs)} differ"
        )


def _lock_output_dir(directory: str, output_dir: str) -> RunLock | None:
    """Process 0 locks the run's checkpoints folder (the others get None); every process raises its LockHeld if
    it could not."""
    lock = None

    def take() -> None:
        nonlocal lock
        storage.makedirs(directory)
        store = lock_store_for(directory)
        if store is None:
            logger.warning("no run lock for %s yet: make sure no other run writes there", directory)
        else:
            lock = RunLock(store, f"output_dir {output_dir}").acquire()

    process_0_decides(take)
    return lock


@dataclasses.dataclass
class RunCheckpoints:
    """This run's checkpoints: `checkpointer` (output_dir's, locked by `lock`) and what to resume from.

    `candidates` are the steps of `source` to try, newest first (empty: a fresh start); an `explicit` step is
    the only candidate and must verify.
    """

    checkpointer: Checkpointer
    source: Checkpointer
    candidates: list[int]
    explicit: bool
    config: dict
    lock: RunLock | None
    skipped: dict[int, str] = dataclasses.field(default_factory=dict)

    @property
    def resuming(self) -> bool:
        return bool(self.candidates)

    def restore(self, abstract_state: Any) -> tuple[int, Any, dict]:
        """(step, state, data position) of the newest candidate that verifies; the steps after it in this
        run's own folder (an abandoned trajectory, or damaged) are moved aside. Raises CheckpointCorrupt."""
        for i, step in enumerate(self.candidates):
            try:
                if i > 0:  # the first was checked in `prepare`; process 0 reads the config for all
                    _check_compatible(self.source, step, self.config)
                state, data = self.source.restore(step, abstract_state)
            except CheckpointCorrupt as e:
                if self.explicit:
                    raise
                logger.warning("resume_from_checkpoint=latest: skipping %s", e)
                self.skipped[step] = str(e)
                continue
            if self.source is self.checkpointer:
                newer = [s for s in self.checkpointer.all_steps() if s > step]
                if newer:
                    where = self.checkpointer.set_aside(newer)
                    logger.warning(
                        "resuming from step %d: moved the newer checkpoints %s (another trajectory, or damaged) to %s",
                        step,
                        newer,
                        where,
                    )
            return step, state, data
        raise self._none_verifies()

    def _none_verifies(self) -> CheckpointCorrupt:
        return CheckpointCorrupt(
            f"no checkpoint in {self.source.directory} verifies ({'; '.join(self.skipped.values())}); "
            f"move the damaged ones away, or start over with overwrite_output_dir=True and no resume_from_checkpoint"
        )

    def close(self) -> None:
        """Wait for saves, then release the lock (every exit of the run must call this)."""
        try:
            for c in {self.checkpointer, self.source}:
                c.close()
        finally:
            if self.lock is not None:
                self.lock.release()


def prepare(config: Any) -> RunCheckpoints:
    """Take output_dir for this run and decide where it starts, before anything compiles (every process).

    Raises ValueError (one line) for a local output_dir that not all processes see, an output_dir another live run
    holds, a fresh start over an earlier run's checkpoints without `overwrite_output_dir`, or a resume step that is
    missing or incompatible.
    """
    limit = config.checkpoints_total_limit  # >= 1 (resolve_config): orbax's 0 would delete every checkpoint
    directory = checkpoint_dir(config)
    check_shared_dir(storage.abspath(config.output_dir))
    lock = _lock_output_dir(directory, config.output_dir)
    checkpointer = source = None
    try:
        checkpointer = Checkpointer(directory, max_to_keep=limit)
        checkpointer.lock = lock
        resume_dir, resume_at = process_0_decides(lambda: resolve_resume(config.resume_from_checkpoint, directory))
        resume_dir = storage.abspath(resume_dir)
        own = checkpointer.all_steps()
        if own and (resume_at is None or resume_dir != directory):
            if not config.overwrite_output_dir:
                raise ValueError(
                    f"{directory} holds checkpoints {own} of an earlier run; continue it with "
                    f"--config.resume_from_checkpoint=latest, or delete them with --config.overwrite_output_dir=True, "
                    f"or choose another output_dir"
                )
            checkpointer.remove(own)
            logger.warning("overwrite_output_dir: deleted the earlier run's checkpoints %s in %s", own, directory)
        source = checkpointer
        if resume_at is not None and resume_dir != directory:
            source = Checkpointer(resume_dir, read_only=True)
        settings = config.to_dict()
        if resume_at is None:
            return RunCheckpoints(checkpointer, source, [], False, settings, lock)
        steps = source.all_steps()
        if resume_at != "latest" and resume_at not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {resume_at} in {source.directory} (found {steps or 'none'})"
            )
        run = RunCheckpoints(checkpointer, source, [], resume_at != "latest", settings, lock)

        def pick() -> tuple[list[int], dict[int, str]]:
            candidates, skipped = [], {}
            for step in [resume_at] if run.explicit else reversed(steps):
                try:
                    if not candidates:  # the newest readable one must fit this config (the rest: on restore)
                        _check_compatible(source, step, settings)
                except CheckpointCorrupt as e:
                    if run.explicit:
                        raise
                    logger.warning("resume_from_checkpoint=latest: skipping %s", e)
                    skipped[step] = str(e)
                    continue
                candidates.append(step)
            return candidates, skipped

        run.candidates, run.skipped = process_0_decides(pick)
        if not run.candidates and not run.skipped:
            logger.info("resume_from_checkpoint=latest: no checkpoint in %s, starting fresh", source.directory)
        elif not run.candidates:
            raise run._none_verifies()
        return run
    except BaseException:
        for c in {checkpointer, source} - {None}:
            c.close()
        if lock is not None:
            lock.release()
        raise


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
            from uncond_flax.cli import sigterm_received

            if sigterm_received():  # arrived while starting, before this handler: stop at the first chance
                self._event.set()

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
