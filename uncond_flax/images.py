"""Image grids and PNG writing for samples in [0, 1]."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from uncond_flax import storage


def to_uint8(images_BHWC: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded as diffusers' `numpy_to_pil` does."""
    return (np.asarray(images_BHWC) * 255).round().astype(np.uint8)


def make_grid(images_BHWC: np.ndarray, cols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile a batch of [0, 1] images into one PIL image, `cols` per row (default: near-square), `pad` gray px apart."""
    images = to_uint8(images_BHWC)
    b, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 128, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = img
    return Image.fromarray(grid[..., 0] if c == 1 else grid)


def save_grid(images_BHWC: np.ndarray, path: str, cols: int | None = None, pad: int = 2) -> str:
    """Write the grid as a PNG to `path` (a local path or a URL such as gs://…, whole or not at all); returns it."""
    png = io.BytesIO()
    make_grid(images_BHWC, cols, pad).save(png, format="PNG")
    storage.write_bytes(path, png.getvalue())
    return path
