"""Image grids and PNG writing for samples in [0, 1]."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    make_grid(images_BHWC, cols, pad).save(path)
    return path
