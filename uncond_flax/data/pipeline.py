"""The moving parts under TrainLoader: the grain iterator (threads, worker processes) and the thread that
puts finished batches on the devices while the current step runs."""

from __future__ import annotations

import functools
import json
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from uncond_flax.data.steps import StepReader
from uncond_flax.data.workers import exit_with_parent

_NO_SHM = 2**62  # min_shm_size: no array is that large


def grain_iterator(reader: StepReader, start: int, stop: int, num_workers: int, threads: int | None):
    import grain

    if threads is None:  # decode releases the GIL, so a few threads per process help even in-process
        threads = min(8, os.cpu_count() or 1) if num_workers == 0 else 2
    ds = grain.MapDataset.range(start, stop).map(reader)
    # Each element is a whole batch: a buffer of `threads` batches keeps every thread busy, and no more.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; outside absl.app.run
            flags.FLAGS.mark_as_parsed()
        # Batches come back pickled through grain's queues, not in shared memory: grain leaves a batch's shared
        # memory block behind when its workers stop mid-flight, and the resource tracker's warning about it is
        # then printed after our own last line. Both ways copy a batch twice (into the pipe or block, and out).
        ds = grain.experimental.WithOptionsIterDataset(ds, grain.experimental.DatasetOptions(min_shm_size=_NO_SHM))
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2),
            worker_init_fn=functools.partial(exit_with_parent, os.getpid()),
        )
    return iter(ds)


END = object()  # what Pipeline.next returns after the last step


class Pipeline:
    """One running grain iterator (+ an optional thread that moves batches to devices ahead of use)."""

    def __init__(self, grain_iter, convert: Callable[[dict], tuple], device_prefetch: int):
        self._iter, self._convert = grain_iter, convert
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread = None
        if device_prefetch > 0:
            self._queue = queue.Queue(maxsize=device_prefetch)
            self._thread = threading.Thread(
                target=_produce,
                args=(grain_iter, convert, self._queue, self._stop),
                name="uncond_flax-device-prefetch",
                daemon=True,
            )
            self._thread.start()

    def next(self) -> Any:
        if self._queue is None:
            try:
                return self._convert(next(self._iter))
            except StopIteration:
                return END
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                _drain(self._queue)
                self._thread.join(timeout=0.05)
            _drain(self._queue)
        if self._iter is not None:
            close = getattr(self._iter, "close", None)
            if close is not None:
                close()
            self._iter = None


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def _produce(grain_iter, convert, q: queue.Queue, stop: threading.Event) -> None:
    try:
        for element in grain_iter:
            item = convert(element)
            del element
            if not _put(q, item, stop):
                return
        _put(q, END, stop)
    except BaseException as e:  # noqa: BLE001 -- handed to the consuming thread, which raises it
        _put(q, e, stop)


def make_convert(sharding: Any, global_shape: tuple[int, ...], to_device: bool) -> Callable[[dict], tuple]:
    def convert(element: dict) -> tuple:
        images = np.array(element["images"])  # our own copy: grain may reuse its buffers
        if to_device:
            import jax

            images = jax.make_array_from_process_local_data(sharding, images, global_shape)
        return {"images": images}, np.array(element["skipped"]), json.loads(str(element["skipped_reasons"]))

    return convert
