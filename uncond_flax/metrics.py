"""What a run logs: metric writers (metrics.jsonl, tensorboard via tensorboardX, or wandb) that only process 0
opens, and the per-step logger that fetches metrics from the device in batches."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from uncond_flax import storage
from uncond_flax.errors import check_choice
from uncond_flax.images import to_uint8

logger = logging.getLogger(__name__)

LOGGERS = ("tensorboard", "wandb")
METRICS_FILE = "metrics.jsonl"


class NonFiniteStop(FloatingPointError):
    """Too many consecutive steps had a non-finite loss or gradients; the message is one line."""


def check_logger(name: str) -> None:
    """Fail before any compile if the chosen logger cannot be used."""
    check_choice("logger", name, LOGGERS)
    if name == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("logger='wandb' needs the wandb package: pip install wandb") from None


def repair_metrics_file(path: str, keep_through_step: int) -> int:
    """Keep the complete lines of `path` whose step is <= `keep_through_step`; returns how many lines went.

    A crash or a full disk can leave a half-written last line, and a resumed run replays the steps after its
    checkpoint: both would otherwise stay in the file forever (a broken JSON-lines file, duplicated steps).
    """
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    kept, dropped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= keep_through_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(b"".join(line + b"\n" for line in kept))
        os.replace(tmp, path)
    return dropped


def tensorboardx_summary_writer() -> type:
    """tensorboardX's `SummaryWriter` class, imported without importing torch.

    tensorboardX imports torch whenever it is installed (only to accept torch tensors; this module hands it
    numpy), which cost the trainer's start 1.6 s of CPU here, and more from a cold disk. torch is hidden from that
    one import; a torch already imported is left as it is.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Scalars and image grids to tensorboard (`<output_dir>/<logging_dir>`) or wandb, scalars also to
    `<log_dir>/metrics.jsonl` (one JSON object per step); a no-op off process 0.

    `start_step` is the step the run starts from (0 fresh, else the restored checkpoint's): lines after it, and a
    torn last line, are dropped from an existing metrics.jsonl first. `config` must hold no secrets.
    """

    def __init__(self, name: str, log_dir: str, config: Mapping[str, Any], enabled: bool = True, start_step: int = 0):
        self.name = name
        self._tb = self._wandb = self._jsonl = self._staging = None
        if not enabled:
            return
        # Writers that need a local folder (an appended file, tensorboard, wandb) write into `staging.local`:
        # `log_dir` itself when local, else a staging folder copied to the bucket at each flush and at exit.
        self._staging = storage.SyncedDir(log_dir, pull=(METRICS_FILE,), every_s=60)
        local_dir = self._staging.local
        path = os.path.join(local_dir, METRICS_FILE)
        dropped = repair_metrics_file(path, start_step)
        if dropped:
            logger.info("%s: dropped %d line(s) after step %d (torn or replayed)", path, dropped, start_step)
        self._jsonl_path = path
        self._jsonl = open(path, "a", buffering=1)  # line-buffered: each step's line reaches the file as written
        if name == "tensorboard":
            self._tb = tensorboardx_summary_writer()(local_dir)
        else:
            import wandb

            self._wandb = wandb.init(project="train_unconditional", dir=local_dir, config=dict(config))

    @contextlib.contextmanager
    def _writing(self, path: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            # A write through an open file names no file. Name it; the trainer words the error (a full disk, with
            # what to do) once for every output it writes.
            if e.filename is None:
                e.filename = path
            raise

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._jsonl is not None:
            with self._writing(self._jsonl_path):
                # One write per line: a crash leaves at most one torn line, which the next start drops.
                self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, float(value), step)
        if self._wandb is not None:
            self._wandb.log({k: float(v) for k, v in values.items()}, step=step)

    def images(self, step: int, tag: str, images_BHWC: np.ndarray) -> None:
        """[0, 1] images; written as uint8 like diffusers' trainer does."""
        images = to_uint8(images_BHWC)
        if self._tb is not None:
            self._tb.add_images(tag, images, step, dataformats="NHWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: [wandb.Image(img) for img in images]}, step=step)

    def flush(self, upload: bool = False) -> None:
        """Write out buffered lines; a staged log folder is copied up if `upload` or its interval has passed."""
        if self._jsonl is not None:
            with self._writing(self._jsonl_path):
                self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()
        if self._staging is not None:
            self._staging.sync(force=upload)

    def close(self) -> None:
        if self._jsonl is not None:
            try:
                self._jsonl.close()
            except OSError:  # the error was reported when the write failed
                pass
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._staging is not None:
            self._staging.close()
        self._tb = self._wandb = self._jsonl = self._staging = None


class StepLogger:
    """Per-step metrics, fetched from the device every `every` steps (no host sync per step), written one line a
    step, with `img/s` over the time spent stepping (compile, checkpoints and previews excluded via `paused`).

    On a terminal a tqdm bar shows progress; elsewhere (CI, nohup, SLURM) a log line every `every` steps does.
    """

    def __init__(
        self,
        writer: MetricWriter,
        *,
        images_per_step: int,
        total_steps: int,
        every: int,
        max_consecutive_skips: int,
        use_ema: bool,
        enabled: bool = True,
        interactive: bool | None = None,
    ):
        self.writer, self.images_per_step, self.every = writer, images_per_step, max(1, every)
        # mfu_of(seconds_per_step): the model FLOPs utilisation at that speed (None: unknown, not logged). Set once
        # the step is compiled and its FLOPs are known.
        self.mfu_of: Callable[[float], float | None] | None = None
        self.max_consecutive_skips, self.use_ema, self.enabled = max_consecutive_skips, use_ema, enabled
        self.total_steps = total_steps
        self.pending: list[tuple[int, Any]] = []
        self.last: dict[str, float] = {}
        self._window_start = time.perf_counter()
        self._excluded = 0.0
        self._steps_in_window = 0
        interactive = sys.stderr.isatty() if interactive is None else interactive
        self._bar = None
        if enabled and interactive:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, desc="Steps")

    def start(self, step: int) -> None:
        """Timing starts now, at `step` (after compiling and restoring)."""
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()
        self._window_start, self._excluded, self._steps_in_window = time.perf_counter(), 0.0, 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count toward img/s (checkpoints, previews, exports)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - start

    def push(self, step: int, metrics: Any) -> None:
        """Record step `step`'s metrics (device arrays); fetched and written every `every` steps."""
        self.pending.append((step, metrics))
        self._steps_in_window += 1
        if self._bar is not None:
            self._bar.update(1)
        if len(self.pending) >= self.every:
            self.drain()

    def drain(self) -> None:
        """Fetch and write everything pending; raises NonFiniteStop after too many non-finite steps in a row."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        fetched = jax.device_get([m for _, m in pending])
        now = time.perf_counter()
        seconds = max(now - self._window_start - self._excluded, 1e-9)
        img_s = self.images_per_step * self._steps_in_window / seconds
        mfu = self.mfu_of(seconds / self._steps_in_window) if self.mfu_of and self._steps_in_window else None
        self._window_start, self._excluded, self._steps_in_window = now, 0.0, 0
        for (step, _), metrics in zip(pending, fetched, strict=True):
            values = {k: float(v) for k, v in metrics.items()}
            values["img/s"] = img_s
            if mfu is not None:
                values["mfu"] = mfu
            consecutive = int(values.pop("consecutive_skips"))
            if not self.use_ema:
                values.pop("ema_decay", None)
            self.writer.scalars(step, values)
            self.last = values
            if consecutive >= self.max_consecutive_skips:
                raise NonFiniteStop(
                    f"{consecutive} consecutive steps had a non-finite loss or gradients (step {step}, loss "
                    f"{values['loss']}, grad_norm {values.get('grad_norm')}); stopping. Try a lower learning_rate "
                    "or mixed_precision='bf16' (max_consecutive_skips sets the limit)"
                )
        step, values = pending[-1][0], self.last
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", img_s=f"{img_s:.0f}")
        elif self.enabled:
            logger.info(
                "step %d/%d: loss %.4f, lr %.3g, %.1f img/s",
                step,
                self.total_steps,
                values["loss"],
                values["lr"],
                img_s,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
