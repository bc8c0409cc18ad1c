"""Host-side image transforms with the semantics of diffusers' train_unconditional.py.

diffusers composes torchvision's ``Resize(resolution, BILINEAR)`` → ``CenterCrop``/``RandomCrop`` →
``RandomHorizontalFlip`` on PIL images converted to RGB. We do the same on PIL/numpy and stop at uint8 HWC:
the [-1, 1] normalisation happens on device inside the jitted step (4x less host→device traffic).

This module must not import JAX: it runs inside grain's spawned worker processes.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps

# Keys the per-example RNG streams apart: crop/flip draws vs. substitutes for skipped bad images.
AUGMENT_STREAM = 0
SUBSTITUTE_STREAM = 1


class BadImageError(ValueError):
    """An example whose image cannot be read or decoded; the message names the source and example index."""


def image_mode(in_channels: int) -> str:
    """PIL mode for the model's input channels: L for 1, RGB for 3 (diffusers always feeds RGB)."""
    if in_channels == 1:
        return "L"
    if in_channels == 3:
        return "RGB"
    raise ValueError(f"model.in_channels must be 1 (grayscale) or 3 (RGB) for image training, got {in_channels}")


def decode_image(raw: Any) -> PIL.Image.Image:
    """Decodes what a dataset row holds (encoded bytes, a path, a datasets ``{"bytes", "path"}`` dict, an array
    or a PIL image) into a fully loaded PIL image, EXIF orientation applied as ``datasets.Image`` does."""
    if isinstance(raw, PIL.Image.Image):
        image = raw
    elif isinstance(raw, dict):
        if raw.get("bytes") is not None:
            image = PIL.Image.open(io.BytesIO(raw["bytes"]))
        elif raw.get("path") is not None:
            image = PIL.Image.open(raw["path"])
        else:
            raise ValueError("the image record has neither bytes nor a path")
    elif isinstance(raw, (bytes, bytearray, memoryview)):
        image = PIL.Image.open(io.BytesIO(bytes(raw)))
    elif isinstance(raw, (str, os.PathLike)):
        image = PIL.Image.open(raw)
    elif isinstance(raw, (np.ndarray, list)):
        return _array_to_image(np.asarray(raw))
    elif raw is None:
        raise ValueError("the image is missing (None)")
    else:
        raise ValueError(f"cannot read an image from a {type(raw).__name__}")
    image.load()  # decode now, inside the caller's error handling, and release the file handle
    if image.getexif().get(PIL.Image.ExifTags.Base.Orientation) is not None:
        image = PIL.ImageOps.exif_transpose(image)
    return image


def _array_to_image(arr: np.ndarray) -> PIL.Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"an image array must be HW, HW1, HW3 or HW4, got shape {arr.shape}")
    if arr.dtype == np.uint16:
        arr = _scale_16bit(arr)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8 or uint16, got {arr.dtype}")
    return PIL.Image.fromarray(np.ascontiguousarray(arr))


def _scale_16bit(arr: np.ndarray) -> np.ndarray:
    # Scale (rounded) rather than clip: PIL's own I;16 -> L conversion clips, which saturates real 16-bit images.
    return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def convert_mode(image: PIL.Image.Image, mode: str) -> PIL.Image.Image:
    """Converts to ``mode`` (RGB or L) like ``image.convert(mode)``, but 16-bit/32-bit/float images are rescaled
    to 8 bits instead of clipped, and palette images with transparency go through RGBA (no PIL warning)."""
    if image.mode == mode:
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        arr = np.asarray(image)
        if image.mode == "F":
            arr = arr * 255.0 if arr.size and float(arr.max()) <= 1.0 else arr
            arr8 = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        elif image.mode == "I" and (not arr.size or int(arr.max()) <= 255):
            arr8 = np.clip(arr, 0, 255).astype(np.uint8)  # 32-bit container holding 8-bit values
        else:
            arr8 = _scale_16bit(np.clip(arr, 0, 65535).astype(np.uint16))
        image = PIL.Image.fromarray(arr8, mode="L")
        return image if mode == "L" else image.convert(mode)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    # RGBA/LA: alpha is dropped as diffusers' image.convert("RGB") does; CMYK/YCbCr/1/P: PIL's conversions.
    return image.convert(mode)


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(size)``: shorter side = size, longer side truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_shorter_side(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """torchvision ``Resize(size, BILINEAR)`` on a PIL image: PIL's antialiased bilinear filter."""
    new_size = resized_size(image.width, image.height, size)
    if new_size == image.size:
        return image
    return image.resize(new_size, PIL.Image.Resampling.BILINEAR)


def load_resized(raw: Any, resolution: int, mode: str) -> np.ndarray:
    """Decode → RGB/L → shorter side resized to ``resolution``: uint8 (H, W, C), before any crop."""
    image = resize_shorter_side(convert_mode(decode_image(raw), mode), resolution)
    arr = np.asarray(image, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def example_rng(seed: int, epoch: int, index: int, stream: int = AUGMENT_STREAM) -> np.random.Generator:
    """The random stream of one example in one epoch: independent of workers, processes and timing."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), int(index), int(stream)])


def center_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``CenterCrop(size)``; Python's round (half to even), as torchvision uses."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def random_crop_offsets(height: int, width: int, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """(top, left) of ``RandomCrop(size)``: uniform over all valid positions, top drawn first as torchvision does."""
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return top, left


def crop_and_flip(
    image_HWC: np.ndarray,
    size: int,
    *,
    center_crop: bool,
    random_flip: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """Center or random ``size``×``size`` crop, then horizontal flip with p = 0.5: uint8 (size, size, C)."""
    height, width = image_HWC.shape[:2]
    if height < size or width < size:
        raise ValueError(f"image of {height}x{width} is smaller than the {size}x{size} crop")
    if center_crop:
        top, left = center_crop_offsets(height, width, size)
    else:
        top, left = random_crop_offsets(height, width, size, rng)
    out = image_HWC[top : top + size, left : left + size]
    if random_flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def preprocess(
    raw: Any,
    *,
    resolution: int,
    mode: str,
    center_crop: bool,
    random_flip: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """The whole per-example transform of diffusers' script, ending at uint8 (resolution, resolution, C)."""
    resized = load_resized(raw, resolution, mode)
    return crop_and_flip(resized, resolution, center_crop=center_crop, random_flip=random_flip, rng=rng)
