"""Optional decode cache: every image decoded and resized once, kept as uint8 (uint16 with
``preserve_input_precision``) under ``cache_dir``.

What is stored is the image after decode → RGB/L → shorter side = resolution, *before* the crop, so random
crop and flip still differ per epoch. Layout of one cache folder: ``data.bin`` (all images' pixels, back to
back), ``index.npy`` (N × 3 int64: element offset, height, width; height 0 marks an image that failed to
decode), ``errors.json`` (index → reason) and ``meta.json``. It is built in a temporary folder and renamed into
place, so concurrent builders (several hosts sharing ``cache_dir``) never see a half-written cache. A cache found
damaged later (a truncated or missing file) is set aside and built again.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import uuid
from typing import Any

import numpy as np

from uncond_flax.data.sources import ImageSource
from uncond_flax.data.transforms import SKIP_BAD_IMAGES_HINT, BadImageError, describe_failure, image_dtype, load_resized
from uncond_flax.data.workers import exit_with_parent

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: pixels of `dtype` (uint8 or uint16); reasons name the example and file
_CHUNK = 128  # examples per task: large enough to amortise pickling, small enough to balance 2 workers


def default_cache_root() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "uncond_flax")


class DamagedCacheError(ValueError):
    """A cache folder whose files do not add up (truncated, missing, unreadable)."""


class DecodeCache:
    """Read side of a built cache; memory-maps lazily so it pickles cheaply into worker processes.

    Opening checks that the files add up (DamagedCacheError otherwise): a truncated ``data.bin`` would otherwise
    surface as a reshape error in the middle of training."""

    def __init__(self, directory: str):
        self.directory = directory
        try:
            with open(os.path.join(directory, "meta.json")) as f:
                meta = json.load(f)
            with open(os.path.join(directory, "errors.json")) as f:
                self.errors = {int(k): v for k, v in json.load(f).items()}
            self._index = np.load(os.path.join(directory, "index.npy"))
            data_bytes = os.path.getsize(os.path.join(directory, "data.bin"))
            self.channels, self.dtype = int(meta["channels"]), np.dtype(meta["dtype"])
            version, n = meta["format"], int(meta["num_examples"])
        except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
            raise DamagedCacheError(f"{type(e).__name__}: {e}") from None
        if version != CACHE_FORMAT_VERSION:
            raise DamagedCacheError(f"format {version}, expected {CACHE_FORMAT_VERSION}")
        if self._index.shape != (n, 3):
            raise DamagedCacheError(f"index.npy has shape {self._index.shape}, expected ({n}, 3)")
        offset, height, width = self._index.T
        expected = int((offset + height * width * self.channels).max(initial=0)) * self.dtype.itemsize
        if data_bytes != expected:
            raise DamagedCacheError(f"data.bin has {data_bytes} bytes, its index needs {expected}")
        self._data: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._index)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}

    def get(self, index: int) -> np.ndarray | None:
        """The resized uint8 (H, W, C) image, or None if it failed to decode when the cache was built."""
        offset, height, width = (int(v) for v in self._index[index])
        if height == 0:
            return None
        if self._data is None:
            self._data = np.memmap(os.path.join(self.directory, "data.bin"), dtype=self.dtype, mode="r")
        size = height * width * self.channels
        return np.array(self._data[offset : offset + size]).reshape(height, width, self.channels)


def cache_key(source: ImageSource, resolution: int, mode: str, preserve_input_precision: bool = False) -> str:
    key = [CACHE_FORMAT_VERSION, source.fingerprint, len(source), resolution, mode, preserve_input_precision]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]


def _decode_chunk(source: ImageSource, start: int, stop: int, resolution: int, mode: str, precise: bool) -> list:
    out: list[Any] = []
    for i in range(start, stop):
        raw = None
        try:
            raw = source.get_raw(i)
            out.append(load_resized(raw, resolution, mode, precise))
        except Exception as e:  # noqa: BLE001 -- any decode failure is a bad image, reported by index
            out.append(describe_failure(i, raw, e))
    return out


def _open_or_set_aside(directory: str) -> DecodeCache | None:
    """The cache in ``directory``; None if there is none, or it was damaged (then moved aside and deleted)."""
    if not os.path.exists(directory):
        return None
    try:
        return DecodeCache(directory)
    except DamagedCacheError as e:
        logger.warning("decode cache %s is damaged (%s): building it again", directory, e)
    aside = f"{directory}.damaged-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(directory, aside)  # another process may have moved it first: then it is gone already
    except FileNotFoundError:
        return None
    shutil.rmtree(aside, ignore_errors=True)
    return None


def build_or_open_decode_cache(
    source: ImageSource,
    *,
    resolution: int,
    mode: str,
    cache_root: str | None,
    num_workers: int,
    skip_bad_images: bool,
    preserve_input_precision: bool = False,
) -> DecodeCache:
    """Opens the cache for (source, resolution, mode, precision) under ``cache_root``, building it first if
    missing or damaged."""
    root = os.path.join(cache_root or default_cache_root(), "uncond_flax_decode_cache")
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.name)[-60:]
    key = cache_key(source, resolution, mode, preserve_input_precision)
    bits = "16" if preserve_input_precision else ""
    directory = os.path.join(root, f"{safe_name}-r{resolution}{mode}{bits}-{key}")
    cache = _open_or_set_aside(directory)
    if cache is not None:
        _check_bad(cache, source, skip_bad_images)
        return cache

    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{uuid.uuid4().hex[:8]}-", dir=root)
    try:
        n = len(source)
        logger.info("decode cache: decoding %d images of %s into %s", n, source.name, directory)
        chunks = [(s, min(s + _CHUNK, n)) for s in range(0, n, _CHUNK)]
        index = np.zeros((n, 3), np.int64)
        errors: dict[int, str] = {}
        channels = 1 if mode == "L" else 3
        offset = 0
        decoded = _run_chunks(source, chunks, resolution, mode, num_workers, preserve_input_precision)
        with open(os.path.join(tmp, "data.bin"), "wb") as f:
            for (start, _), results in zip(chunks, decoded, strict=True):
                for i, item in enumerate(results, start):
                    if isinstance(item, str):
                        if not skip_bad_images:
                            raise BadImageError(f"{source.name}: {item}; {SKIP_BAD_IMAGES_HINT}")
                        errors[i] = item
                        index[i] = (offset, 0, 0)
                        continue
                    f.write(item.tobytes())
                    index[i] = (offset, item.shape[0], item.shape[1])
                    offset += item.size
        np.save(os.path.join(tmp, "index.npy"), index)
        with open(os.path.join(tmp, "errors.json"), "w") as f:
            json.dump({str(k): v for k, v in errors.items()}, f)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(
                {
                    "source": source.name,
                    "fingerprint": source.fingerprint,
                    "resolution": resolution,
                    "mode": mode,
                    "channels": channels,
                    "dtype": np.dtype(image_dtype(preserve_input_precision)).name,
                    "num_examples": n,
                    "format": CACHE_FORMAT_VERSION,
                },
                f,
            )
        try:
            os.rename(tmp, directory)
        except OSError:  # another process finished the same cache first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cache = DecodeCache(directory)
    _check_bad(cache, source, skip_bad_images)
    return cache


def _check_bad(cache: DecodeCache, source: ImageSource, skip_bad_images: bool) -> None:
    if cache.errors and not skip_bad_images:
        i = min(cache.errors)
        raise BadImageError(f"{source.name}: {cache.errors[i]}; {SKIP_BAD_IMAGES_HINT}")
    if cache.errors:
        logger.warning(
            "decode cache: %d bad images of %s will be skipped: examples %s",
            len(cache.errors),
            source.name,
            sorted(cache.errors)[:20],
        )


def _run_chunks(source, chunks, resolution, mode, num_workers, precise=False):
    if num_workers <= 0:
        for start, stop in chunks:
            yield _decode_chunk(source, start, stop, resolution, mode, precise)
        return
    # spawn, not fork: the parent has JAX (and its threads) loaded.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=ctx, initializer=exit_with_parent, initargs=(os.getpid(),)
    ) as pool:
        futures = [pool.submit(_decode_chunk, source, a, b, resolution, mode, precise) for a, b in chunks]
        for future in futures:
            yield future.result()
