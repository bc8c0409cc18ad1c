"""The training input pipeline: grain on the host → one global, sharded ``jax.Array`` per optimizer step.

Determinism. The data of global step ``k`` is a pure function of (seed, dataset, global batch, accumulation);
see ``steps.py``. The grain pipeline is ``MapDataset.range(k0, ...).map(read step)``: each element is one
step's local batch, so grain's worker interleaving cannot reorder or regroup examples, and neither the worker
count nor the process count changes any batch. Restoring a position is rebuilding the pipeline at that step;
it needs no grain state, so a run may resume with another worker count.
"""

from __future__ import annotations

import logging
import sys
import weakref
from typing import Any, Self

import numpy as np

from uncond_flax.data.decode_cache import build_or_open_decode_cache
from uncond_flax.data.pipeline import END, Pipeline, grain_iterator, make_convert
from uncond_flax.data.sources import open_source
from uncond_flax.data.steps import BatchLayout, StepReader
from uncond_flax.data.transforms import BadImageError, image_dtype, image_mode

logger = logging.getLogger(__name__)

STATE_VERSION = 1


def check_resolution(resolution: int, block_out_channels: tuple[int, ...] | list[int]) -> None:
    """Raises ValueError unless ``resolution`` is divisible by the UNet's total downsampling factor."""
    from uncond_flax.models.unet_2d import downsampling_factor  # here: grain's workers import this module, not JAX

    factor = downsampling_factor({"block_out_channels": block_out_channels})
    if not isinstance(resolution, int) or resolution <= 0 or resolution % factor:
        raise ValueError(
            f"resolution {resolution} is not divisible by the UNet's downsampling factor {factor} "
            f"(2 ** (len(block_out_channels) - 1), block_out_channels={tuple(block_out_channels)})"
        )


def _close_holder(holder: list) -> None:
    if holder[0] is not None:
        pipeline, holder[0] = holder[0], None
        pipeline.close()


class TrainLoader:
    """Iterator of optimizer steps: ``{"images": uint8 (A, B, H, W, C)}`` (uint16 with preserve_input_precision),
    a global ``jax.Array`` sharded
    ``P(None, ("data", "fsdp"))``; A = gradient_accumulation_steps, B = train_batch_size × devices.

    It runs over epochs forever (or until ``max_steps`` global steps); the trainer decides when to stop and
    reads ``epoch`` / ``step_in_epoch`` for the position of the *next* batch. With simulated processes
    (``process_count`` differing from JAX's, in tests) it yields this process's numpy part (A, B/P, H, W, C).
    """

    def __init__(
        self,
        reader: StepReader,
        *,
        sharding: Any,
        global_shape: tuple[int, ...],
        to_device: bool,
        num_workers: int,
        threads_per_worker: int | None = None,
        device_prefetch: int = 2,
        max_steps: int | None = None,
    ):
        self._reader, self.layout = reader, reader.layout
        self.global_shape, self.to_device = tuple(global_shape), to_device
        self.num_workers, self.threads_per_worker = num_workers, threads_per_worker
        self.device_prefetch, self.max_steps = device_prefetch, max_steps
        self._convert = make_convert(sharding, self.global_shape, to_device)
        self._step = 0
        self._skipped: set[int] = set()
        self._closed = False
        self._holder: list = [None]  # the running Pipeline; a list so the finalizer need not reference self
        self._finalizer = weakref.finalize(self, _close_holder, self._holder)

    # --- position and sizes -----------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return self.layout.steps_per_epoch

    @property
    def num_examples(self) -> int:
        return self.layout.num_examples

    @property
    def examples_per_step(self) -> int:
        """Examples per optimizer step over all processes: A × B."""
        return self.layout.examples_per_step

    @property
    def global_step(self) -> int:
        """Optimizer steps yielded so far (counting from 0 at the start of training)."""
        return self._step

    @property
    def epoch(self) -> int:
        return self._step // self.steps_per_epoch

    @property
    def step_in_epoch(self) -> int:
        return self._step % self.steps_per_epoch

    @property
    def num_skipped_images(self) -> int:
        """Distinct bad images met so far (only with skip_bad_images; each was replaced by another example)."""
        return len(self._skipped)

    # --- iteration ----------------------------------------------------------------------------------------
    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError("this TrainLoader is closed")
        if self.max_steps is not None and self._step >= self.max_steps:
            raise StopIteration
        if self._holder[0] is None:
            stop = self.max_steps if self.max_steps is not None else sys.maxsize
            grain_iter = grain_iterator(self._reader, self._step, stop, self.num_workers, self.threads_per_worker)
            self._holder[0] = Pipeline(grain_iter, self._convert, self.device_prefetch)
        try:
            item = self._holder[0].next()
        except BadImageError as e:
            _close_holder(self._holder)  # stop the workers; a retry rebuilds the pipeline at this same step
            # Raised afresh, so that grain's note about its filtered traceback stays with the worker's error
            # (shown first, with --verbose) and our one-line message is what prints last.
            raise BadImageError(str(e)) from e
        except BaseException:
            _close_holder(self._holder)
            raise
        if item is END:
            _close_holder(self._holder)
            raise StopIteration
        batch, skipped, reasons = item
        if len(skipped):
            for index, reason in zip(skipped.tolist(), reasons, strict=True):
                if index not in self._skipped:
                    self._skipped.add(index)
                    logger.warning("skipped bad image (%d so far): %s", len(self._skipped), reason)
        self._step += 1
        return batch

    @property
    def dtype(self) -> np.dtype:
        """The images' dtype: uint8, or uint16 with preserve_input_precision (the step scales by its maximum)."""
        return np.dtype(image_dtype(self._reader.preserve_input_precision))

    def batch_spec(self, sharding: Any) -> Any:
        """The shape, dtype and placement of every batch's `images` (a ``jax.ShapeDtypeStruct``): enough to
        compile the step ahead of data."""
        import jax  # not at the top: grain's worker processes import this package and need no JAX

        return jax.ShapeDtypeStruct(self.global_shape, self.dtype, sharding=sharding)

    # --- state ----------------------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: the global step (→ epoch, step_in_epoch) and what fixes the batches."""
        return {
            "version": STATE_VERSION,
            "global_step": self._step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "num_examples": self.num_examples,
            "global_batch_size": self.layout.global_batch_size,
            "accumulation_steps": self.layout.accumulation_steps,
            "seed": self.layout.seed,
            "skipped_indices": sorted(self._skipped),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues exactly after the step where ``get_state`` was taken; the data, global batch size,
        accumulation and seed must match (the worker and process counts may differ)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown data loader state version {state.get('version')!r} (expected {STATE_VERSION})")
        mine = self.get_state()
        keys = ("num_examples", "global_batch_size", "accumulation_steps", "seed")
        diff = [f"{k} {state.get(k)} (now {mine[k]})" for k in keys if state.get(k) != mine[k]]
        if diff:
            raise ValueError("the saved data loader state does not match this run: " + ", ".join(diff))
        step = int(state["global_step"])
        if step < 0 or (state["epoch"], state["step_in_epoch"]) != divmod(step, self.steps_per_epoch):
            raise ValueError(f"inconsistent data loader state: {state}")
        _close_holder(self._holder)  # the running pipeline is ahead of the consumer: restart it at `step`
        self._step = step
        self._skipped = {int(i) for i in state.get("skipped_indices", ())}

    # --- lifetime -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stops the prefetch thread and grain's worker processes; idempotent."""
        if not self._closed:
            self._closed = True
            self._finalizer()
            if self._skipped:
                logger.warning("skipped %d bad images in total", len(self._skipped))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def process_rows(
    mesh: Any, global_batch_size: int, process_index: int, process_count: int
) -> tuple[tuple[int, ...], bool]:
    """The rows of the global batch that ``process_index`` feeds, and whether this is the real process layout.

    Real layout: the rows held by that process's devices under the batch sharding (what
    ``make_array_from_process_local_data`` expects, in ascending order). Simulated: contiguous equal blocks.
    """
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from uncond_flax.parallel import BATCH_AXES

    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise ValueError(f"the global batch of {global_batch_size} does not split over {process_count} processes")
    real = (process_index, process_count) == (jax.process_index(), jax.process_count())
    if not real:
        per = global_batch_size // process_count
        return tuple(range(process_index * per, (process_index + 1) * per)), False
    rows: set[int] = set()
    for device, index in NamedSharding(mesh, P(BATCH_AXES)).devices_indices_map((global_batch_size,)).items():
        if device.process_index == process_index:
            rows.update(range(*index[0].indices(global_batch_size)))
    return tuple(sorted(rows)), True


def build_train_loader(
    config: Any,
    mesh: Any,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    device_prefetch: int = 2,
    max_steps: int | None = None,
    threads_per_worker: int | None = None,
) -> TrainLoader:
    """The training loader described by ``config`` (configs/default.py) for ``mesh``; validates the config,
    opens the dataset and (with ``decode_cache``) builds the cache, all before any JAX compile."""
    check_resolution(config.resolution, config.model.block_out_channels)
    mode = image_mode(config.model.in_channels)
    per_device, accumulation = int(config.train_batch_size), int(config.gradient_accumulation_steps)
    num_workers = int(config.dataloader_num_workers)
    if per_device < 1 or accumulation < 1 or num_workers < 0:
        raise ValueError(
            f"train_batch_size ({per_device}) and gradient_accumulation_steps ({accumulation}) must be "
            f">= 1 and dataloader_num_workers ({num_workers}) >= 0"
        )
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from uncond_flax.parallel import BATCH_AXES

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    num_devices = int(mesh.devices.size)
    global_batch = per_device * num_devices
    rows, real = process_rows(mesh, global_batch, process_index, process_count)

    source = open_source(config)
    n = len(source)
    if n < accumulation * global_batch:
        raise ValueError(
            f"{source.name} has {n} examples, fewer than one optimizer step of {accumulation * global_batch} "
            f"(train_batch_size {per_device} × {num_devices} devices × gradient_accumulation_steps {accumulation})"
        )
    cache = None
    if config.decode_cache:
        cache = build_or_open_decode_cache(
            source,
            resolution=config.resolution,
            mode=mode,
            cache_root=config.cache_dir,
            num_workers=num_workers,
            skip_bad_images=config.skip_bad_images,
            preserve_input_precision=bool(config.preserve_input_precision),
        )
    seed = 0 if config.seed is None else int(config.seed)
    layout = BatchLayout(
        num_examples=n, accumulation_steps=accumulation, global_batch_size=global_batch, rows=rows, seed=seed
    )
    reader = StepReader(
        source,
        layout,
        resolution=config.resolution,
        mode=mode,
        center_crop=bool(config.center_crop),
        random_flip=bool(config.random_flip),
        skip_bad_images=bool(config.skip_bad_images),
        preserve_input_precision=bool(config.preserve_input_precision),
        cache=cache,
    )
    channels = 1 if mode == "L" else 3
    global_shape = (accumulation, global_batch, config.resolution, config.resolution, channels)
    logger.info(
        "data: %s, %d examples, %d steps/epoch of %s (process %d/%d reads %d rows), %d workers%s",
        source.name,
        n,
        layout.steps_per_epoch,
        global_shape,
        process_index,
        process_count,
        len(rows),
        num_workers,
        ", decode cache" if cache else "",
    )
    return TrainLoader(
        reader,
        sharding=NamedSharding(mesh, P(None, BATCH_AXES)),
        global_shape=global_shape,
        to_device=real,
        num_workers=num_workers,
        threads_per_worker=threads_per_worker,
        device_prefetch=device_prefetch,
        max_steps=max_steps,
    )
