"""Metric writers (tensorboard via tensorboardX, or wandb) that only process 0 opens."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from uncond_flax.images import to_uint8

LOGGERS = ("tensorboard", "wandb")


def check_logger(name: str) -> None:
    """Fail before any compile if the chosen logger cannot be used."""
    if name not in LOGGERS:
        raise ValueError(f"logger={name!r} is not supported; choose one of {list(LOGGERS)}")
    if name == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("logger='wandb' needs the wandb package: pip install wandb") from None


class MetricWriter:
    """Scalars and image grids to tensorboard (`<output_dir>/<logging_dir>`) or wandb, scalars also to
    `<log_dir>/metrics.jsonl` (one JSON object per step); a no-op off process 0."""

    def __init__(self, name: str, log_dir: str, config: Mapping[str, Any], enabled: bool = True):
        self.name = name
        self._tb = self._wandb = self._jsonl = None
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        self._jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a", buffering=1)  # a line per step, as it happens
        if name == "tensorboard":
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(log_dir)
        else:
            import wandb

            self._wandb = wandb.init(project="train_unconditional", dir=log_dir, config=dict(config))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._jsonl is not None:
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

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._tb = self._wandb = self._jsonl = None
