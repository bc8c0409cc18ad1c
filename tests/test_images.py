"""Sample grids against diffusers' own `numpy_to_pil` and `make_image_grid` (what its pipelines and script save)."""

import numpy as np
import PIL.Image
from diffusers.utils import make_image_grid, numpy_to_pil

from uncond_flax.images import make_grid, save_grid


def _images(b, h, w, c, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((b, h, w, c), dtype=np.float32)
    images.reshape(-1)[:4] = [0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0]  # halfway cases: round, not truncate
    return images


def test_grid_without_padding_is_diffusers_make_image_grid():
    images = _images(6, 5, 7, 3)
    ours = make_grid(images, cols=3, pad=0)
    expected = make_image_grid(numpy_to_pil(images), rows=2, cols=3)
    assert ours.mode == "RGB" and ours.size == expected.size == (21, 10)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected))


def test_padded_grid_places_each_image_row_by_row_on_gray(tmp_path):
    images = _images(5, 4, 6, 1, seed=1)  # grayscale, and a last row with an empty slot
    path = save_grid(images, str(tmp_path / "grid.png"))  # default: ceil(sqrt(5)) = 3 columns, 2 px apart
    grid = np.asarray(PIL.Image.open(path))
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (6 + 2) + 2)
    tiles = [np.asarray(image) for image in numpy_to_pil(images)]
    background = np.ones(grid.shape, bool)
    for i, tile in enumerate(tiles):
        top, left = 2 + (i // 3) * 6, 2 + (i % 3) * 8
        np.testing.assert_array_equal(grid[top : top + 4, left : left + 6], tile, err_msg=f"image {i}")
        background[top : top + 4, left : left + 6] = False
    assert (grid[background] == 128).all()
