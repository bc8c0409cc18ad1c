"""Host-side image transforms with the semantics of diffusers' train_unconditional.py.

diffusers composes torchvision's ``Resize(resolution, BILINEAR)`` → ``CenterCrop``/``RandomCrop`` →
``RandomHorizontalFlip`` on PIL images converted to RGB. We do the same on PIL/numpy and stop at uint8 HWC:
the [-1, 1] normalisation happens on device inside the jitted step (4x less host→device traffic).

With ``preserve_input_precision`` (diffusers' flag of the same name) an image is not made 8-bit first: it
becomes float32 in [0, 1] at its own precision (16-bit PNG/TIFF, float TIFF, uint16 arrays), is resized in
float32 with the same antialiased bilinear filter, and leaves as uint16 (0..65535): 16-bit inputs keep every
level, at half the bytes of float32, and the step divides by the dtype's maximum as it does for uint8.

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

_BILINEAR = PIL.Image.Resampling.BILINEAR  # PIL's is antialiased (support scales with the zoom), like torchvision's


class BadImageError(ValueError):
    """An example whose image cannot be read or decoded; the message names the source and example index."""


# What a user can do about a bad image; ends the message of every BadImageError that stops a run.
SKIP_BAD_IMAGES_HINT = "fix or remove that file, or set skip_bad_images=True to train on the other images"


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


def describe_failure(index: int, raw: Any, error: BaseException) -> str:
    """``cannot decode example INDEX (PATH): Type: message``; the path when the record names a file."""
    where = raw.get("path") if isinstance(raw, dict) else raw if isinstance(raw, (str, os.PathLike)) else None
    return f"cannot decode example {index}" + (f" ({where})" if where else "") + f": {type(error).__name__}: {error}"


# --- preserve_input_precision ---------------------------------------------------------------------------------

PRECISE_DTYPE = np.uint16
_PRECISE_MAX = float(np.iinfo(PRECISE_DTYPE).max)


def image_dtype(preserve_input_precision: bool) -> type[np.unsignedinteger]:
    """The dtype of the host batches: uint8, or uint16 with ``preserve_input_precision``."""
    return PRECISE_DTYPE if preserve_input_precision else np.uint8


def _unit_range(arr: np.ndarray) -> np.ndarray:
    """An image array as float32 in [0, 1]: integers over their type's range (int32 holds 16-bit PNGs in older
    Pillow, so it counts as 16-bit), floats as given, clipped."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype.kind == "f":
        return np.clip(arr.astype(np.float32), 0.0, 1.0)
    top = 255.0 if arr.dtype.itemsize == 1 else _PRECISE_MAX
    return np.clip(arr.astype(np.float32), 0.0, top) / top


def to_unit_float(raw: Any, mode: str) -> np.ndarray:
    """Decode at the image's own precision → float32 (H, W, 1 or 3) in [0, 1], for ``mode`` L or RGB.

    16-bit and float images (PIL modes I;16*, I, F and uint16/float arrays) keep their values; 8-bit images go
    through ``convert_mode`` as without the flag. Grayscale is repeated to RGB (as diffusers' precision path does);
    an RGB array for an L model is averaged with ITU-R 601 weights, as PIL's L conversion."""
    if isinstance(raw, (np.ndarray, list)):
        arr = np.asarray(raw)
        if arr.ndim == 3 and arr.shape[-1] == 4:
            arr = arr[..., :3]  # alpha dropped, as image.convert("RGB") does
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3)):
            raise ValueError(f"an image array must be HW, HW1, HW3 or HW4, got shape {arr.shape}")
        unit = _unit_range(arr)
    else:
        image = decode_image(raw)
        if image.mode.startswith("I;16") or image.mode in ("I", "F"):
            unit = _unit_range(np.asarray(image))
        else:
            unit = _unit_range(np.asarray(convert_mode(image, mode)))
    if unit.ndim == 2:
        unit = unit[..., None]
    if mode == "RGB" and unit.shape[-1] == 1:
        return np.repeat(unit, 3, axis=-1)
    if mode == "L" and unit.shape[-1] == 3:
        return (unit @ np.asarray([0.299, 0.587, 0.114], np.float32))[..., None]
    return unit


def resize_unit_float(unit_HWC: np.ndarray, size: int) -> np.ndarray:
    """``resize_shorter_side`` for float32 images: the same antialiased bilinear filter, per channel, in float."""
    height, width = unit_HWC.shape[:2]
    new_size = resized_size(width, height, size)
    if new_size == (width, height):
        return unit_HWC
    channels = [
        np.asarray(PIL.Image.fromarray(np.ascontiguousarray(unit_HWC[..., c]), mode="F").resize(new_size, _BILINEAR))
        for c in range(unit_HWC.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def quantize_unit_float(unit: np.ndarray) -> np.ndarray:
    """[0, 1] float32 → uint16 0..65535, rounded to nearest."""
    return np.rint(np.clip(unit, 0.0, 1.0) * _PRECISE_MAX).astype(PRECISE_DTYPE)


# --------------------------------------------------------------------------------------------------------------


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
    return image.resize(new_size, _BILINEAR)


def load_resized(raw: Any, resolution: int, mode: str, preserve_input_precision: bool = False) -> np.ndarray:
    """Decode → RGB/L → shorter side resized to ``resolution``: uint8 (H, W, C), before any crop; uint16 at the
    image's own precision with ``preserve_input_precision``."""
    if preserve_input_precision:
        return quantize_unit_float(resize_unit_float(to_unit_float(raw, mode), resolution))
    image = resize_shorter_side(convert_mode(decode_image(raw), mode), resolution)
    arr = np.asarray(image, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def example_rng(seed: int, epoch: int, index: int, stream: int = AUGMENT_STREAM) -> np.random.Generator:
    """The random stream of one example in one epoch: independent of workers, processes and timing."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), int(index), int(stream)])


def center_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``CenterCrop(size)``; Python's round (half to even), as torchvision uses."""
    return round((height - size) / 2.0), round((width - size) / 2.0)


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
