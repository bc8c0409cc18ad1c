"""Image grids and PNG writing for samples in [0, 1]."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_uint8(images_BHWC: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded as diffusers' `numpy_to_pil` does."""
    return (np.asarray(images_BHWC) * 255).round().astype(np.uint8)


def make_grid(images_BHWC: np.ndarray, cols: int | None = None) -> Image.Image:
    """Tile a batch of [0, 1] images into one PIL image, `cols` per row (default: near-square)."""
    images = to_uint8(images_BHWC)
    b, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    return Image.fromarray(grid[..., 0] if c == 1 else grid)


def save_grid(images_BHWC: np.ndarray, path: str, cols: int | None = None) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    make_grid(images_BHWC, cols).save(path)
    return path
