"""Which examples each global step holds, and reading them: the deterministic core of the input pipeline.

The data of global step ``k`` is a pure function of (seed, dataset, global batch, accumulation): epoch
``e = k // steps_per_epoch`` shuffles all N indices with the seed (one global permutation per epoch); step
``s = k % steps_per_epoch`` takes the next A×B of them, laid out (A, B); process ``p`` decodes only its rows
of B (the rows its devices hold); crop/flip draws are keyed by (seed, epoch, example index). Nothing here
depends on grain's worker count or on the number of processes. This module must not import JAX.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from uncond_flax.data.decode_cache import DecodeCache
from uncond_flax.data.sources import ImageSource
from uncond_flax.data.transforms import (
    SKIP_BAD_IMAGES_HINT,
    SUBSTITUTE_STREAM,
    BadImageError,
    crop_and_flip,
    describe_failure,
    example_rng,
    image_dtype,
    load_resized,
)

_SHUFFLE_STREAM = 0x5EED  # keeps the epoch shuffle's random stream apart from the per-example ones
_MAX_SUBSTITUTES = 64


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The shuffled order of all examples in ``epoch``: the same on every process and every worker."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), _SHUFFLE_STREAM]).permutation(
        num_examples
    )


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Which examples global step ``k`` holds, and which of them this process reads."""

    num_examples: int
    accumulation_steps: int  # A: micro-batches per optimizer step
    global_batch_size: int  # B: examples per micro-batch over all devices of all processes
    rows: tuple[int, ...]  # the rows of B this process reads, ascending
    seed: int

    @property
    def examples_per_step(self) -> int:
        return self.accumulation_steps * self.global_batch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.examples_per_step  # drop remainder: static shapes

    def global_indices(self, step: int, permutation: np.ndarray | None = None) -> np.ndarray:
        """Example indices of global step ``step``, shape (A, B)."""
        epoch, s = divmod(step, self.steps_per_epoch)
        perm = epoch_permutation(self.seed, epoch, self.num_examples) if permutation is None else permutation
        n = self.examples_per_step
        return perm[s * n : (s + 1) * n].reshape(self.accumulation_steps, self.global_batch_size)

    def local_indices(self, step: int, permutation: np.ndarray | None = None) -> np.ndarray:
        """The (A, B_local) example indices this process reads at ``step``."""
        return self.global_indices(step, permutation)[:, list(self.rows)]


class StepReader:
    """grain map function: global step → this process's decoded, augmented uint8 batch (A, B_local, H, W, C)."""

    def __init__(
        self,
        source: ImageSource,
        layout: BatchLayout,
        *,
        resolution: int,
        mode: str,
        center_crop: bool,
        random_flip: bool,
        skip_bad_images: bool,
        preserve_input_precision: bool = False,
        cache: DecodeCache | None = None,
    ):
        self.source, self.layout, self.cache = source, layout, cache
        self.resolution, self.mode = resolution, mode
        self.preserve_input_precision = preserve_input_precision
        self.center_crop, self.random_flip, self.skip_bad_images = center_crop, random_flip, skip_bad_images
        self._perm: tuple[int, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_perm": None}

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:  # one epoch cached: O(N) once per epoch per worker
            self._perm = (epoch, epoch_permutation(self.layout.seed, epoch, self.layout.num_examples))
        return self._perm[1]

    def read_resized(self, index: int) -> np.ndarray:
        """Example ``index`` decoded and resized (before crop); BadImageError names source and index."""
        if self.cache is not None:
            image = self.cache.get(index)
            if image is None:
                raise BadImageError(f"{self.source.name}: {self.cache.errors.get(index)}")
            return image
        raw = None
        try:
            raw = self.source.get_raw(index)
            return load_resized(raw, self.resolution, self.mode, self.preserve_input_precision)
        except Exception as e:  # noqa: BLE001 -- whatever PIL (or a missing file) raises: name the example
            raise BadImageError(f"{self.source.name}: {describe_failure(index, raw, e)}") from None

    def read_example(self, index: int, epoch: int, skipped: list[tuple[int, str]]) -> np.ndarray:
        """Example ``index`` cropped and flipped for ``epoch``; a bad image is an error or, with
        skip_bad_images, replaced by a deterministic random other example (static batch shapes)."""
        candidate = index
        for attempt in range(_MAX_SUBSTITUTES):
            try:
                resized = self.read_resized(candidate)
            except BadImageError as e:
                if not self.skip_bad_images:
                    raise BadImageError(f"{e}; {SKIP_BAD_IMAGES_HINT}") from None
                skipped.append((candidate, str(e)))
                rng = example_rng(self.layout.seed, epoch, index, SUBSTITUTE_STREAM + attempt)
                candidate = int(rng.integers(self.layout.num_examples))
                continue
            rng = example_rng(self.layout.seed, epoch, candidate)
            return crop_and_flip(
                resized, self.resolution, center_crop=self.center_crop, random_flip=self.random_flip, rng=rng
            )
        raise BadImageError(
            f"{self.source.name}: {_MAX_SUBSTITUTES} bad images in a row while replacing bad example "
            f"{index}; is most of the dataset unreadable? (the last: {skipped[-1][1]})"
        )

    def __call__(self, step: int) -> dict[str, Any]:
        epoch = step // self.layout.steps_per_epoch
        indices_AB = self.layout.local_indices(step, self.permutation(epoch))
        channels = 1 if self.mode == "L" else 3
        images_ABHWC = np.empty(
            (*indices_AB.shape, self.resolution, self.resolution, channels), image_dtype(self.preserve_input_precision)
        )
        skipped: list[tuple[int, str]] = []
        for (a, b), index in np.ndenumerate(indices_AB):
            images_ABHWC[a, b] = self.read_example(int(index), epoch, skipped)
        return {
            "images": images_ABHWC,
            "skipped": np.asarray([i for i, _ in skipped], np.int64),
            "skipped_reasons": json.dumps([r for _, r in skipped]),  # one string: a plain leaf for grain
        }
