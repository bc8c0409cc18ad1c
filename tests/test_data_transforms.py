"""Per-example transforms: the values diffusers' torchvision pipeline would produce, before normalisation."""

import io

import numpy as np
import PIL.Image
import pytest
from fixtures.data_factory import gradient

from uncond_flax.data import BatchLayout, ImageSource, StepReader
from uncond_flax.data.transforms import (
    BadImageError,
    center_crop_offsets,
    convert_mode,
    crop_and_flip,
    decode_image,
    example_rng,
    image_mode,
    load_resized,
    random_crop_offsets,
    resize_shorter_side,
    resized_size,
)


class _OneImage(ImageSource):
    name = "one image"

    def __init__(self, raw):
        self.raw = raw

    def __len__(self) -> int:
        return 1

    def get_raw(self, index: int):
        return self.raw

    @property
    def fingerprint(self) -> str:
        return "one image"


def loader_transform(raw, *, resolution: int, mode: str, center_crop: bool, random_flip: bool, **kw) -> np.ndarray:
    """What the loader makes of one example (``StepReader.read_example``: decode, resize, crop, flip), drawn
    with the random stream ``example_rng(0, 0, 0)``; ``kw``: ``preserve_input_precision``."""
    layout = BatchLayout(num_examples=1, accumulation_steps=1, global_batch_size=1, rows=(0,), seed=0)
    reader = StepReader(
        _OneImage(raw),
        layout,
        resolution=resolution,
        mode=mode,
        center_crop=center_crop,
        random_flip=random_flip,
        skip_bad_images=False,
        **kw,
    )
    return reader.read_example(0, 0, [])


def _png(image: PIL.Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "wh, size, expected",
    [
        ((500, 375), 64, (85, 64)),
        ((375, 500), 64, (64, 85)),
        ((64, 64), 64, (64, 64)),
        ((8, 8), 64, (64, 64)),
        ((101, 33), 16, (48, 16)),
        ((33, 101), 16, (16, 48)),
    ],
)
def test_resized_size_matches_torchvision_resize(wh, size, expected):
    # torchvision: short side = size, long side = int(size * long / short) (truncated).
    assert resized_size(*wh, size) == expected


def torch_resize(image_HWC: np.ndarray, size: int) -> np.ndarray:
    """torchvision's ``Resize(size, BILINEAR)`` on a float tensor, which is ``F.interpolate(bilinear,
    antialias=True)`` at (short side = size, long side = int(size * long / short)): float (H, W, C)."""
    import torch
    import torch.nn.functional as F

    h, w = image_HWC.shape[:2]
    out_hw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = torch.from_numpy(np.ascontiguousarray(image_HWC, np.float32)).permute(2, 0, 1)[None]
    y = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False, antialias=True)
    return y[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize(
    "hw, size",
    [((375, 500), 64), ((500, 375), 64), ((33, 101), 16), ((8, 8), 64), ((20, 24), 16), ((64, 64), 16)],
)
def test_resize_matches_torchs_antialiased_bilinear(hw, size):
    rng = np.random.default_rng(sum(hw) + size)
    image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)  # noise: every filter difference shows
    ours = np.asarray(resize_shorter_side(PIL.Image.fromarray(image), size)).astype(np.float32)
    reference = torch_resize(image, size)
    assert ours.shape == reference.shape
    # PIL computes in fixed point and rounds to uint8; torch in float32: never a whole level apart
    assert np.abs(ours - reference).max() < 1.0


def test_resize_antialiases():
    # antialiased: a 1-px checkerboard averages to grey instead of aliasing to black/white
    checker = PIL.Image.fromarray(((np.indices((64, 128)).sum(0) % 2) * 255).astype(np.uint8))
    small = np.asarray(resize_shorter_side(checker, 8)).astype(int)
    assert abs(small.mean() - 127.5) < 3 and small.std() < 10


def test_center_crop_offsets_round_half_to_even_like_torchvision():
    assert center_crop_offsets(64, 85, 64) == (0, 10)  # (85-64)/2 = 10.5 -> 10
    assert center_crop_offsets(87, 64, 64) == (12, 0)  # 11.5 -> 12
    assert center_crop_offsets(70, 70, 64) == (3, 3)


def test_crop_position_and_flip_values():
    image = gradient(20, 30, 9)  # G = x, B = y
    out = crop_and_flip(image, 16, center_crop=True, random_flip=False, rng=example_rng(0, 0, 0))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[0, 0, 1] == 7 and out[0, 0, 2] == 2  # left = round(14/2) = 7, top = round(4/2) = 2
    rng_a, rng_b = example_rng(3, 1, 5), example_rng(3, 1, 5)
    top, left = random_crop_offsets(20, 30, 16, rng_a)
    out = crop_and_flip(image, 16, center_crop=False, random_flip=False, rng=rng_b)
    assert (out[0, 0, 2], out[0, 0, 1]) == (top, left)
    np.testing.assert_array_equal(out, image[top : top + 16, left : left + 16])
    # flip: the flipped crop is the mirror of the unflipped one at the same position
    flips = 0
    for index in range(200):
        plain = crop_and_flip(image, 16, center_crop=True, random_flip=False, rng=example_rng(0, 0, index))
        maybe = crop_and_flip(image, 16, center_crop=True, random_flip=True, rng=example_rng(0, 0, index))
        if not np.array_equal(plain, maybe):
            np.testing.assert_array_equal(maybe, plain[:, ::-1])
            flips += 1
    assert 70 < flips < 130  # p = 0.5


def test_random_crop_covers_all_positions_and_is_keyed_by_seed_epoch_index():
    seen = {random_crop_offsets(20, 18, 16, example_rng(0, 0, i)) for i in range(400)}
    assert seen == {(top, left) for top in range(5) for left in range(3)}

    def draw(*key):
        return random_crop_offsets(100, 100, 16, example_rng(*key))

    assert draw(1, 2, 3) == draw(1, 2, 3)
    assert len({draw(1, e, 3) for e in range(10)}) > 1  # a new crop every epoch
    assert len({draw(s, 2, 3) for s in range(10)}) > 1


def test_loader_transform_range_dtype_shape():
    image = gradient(37, 50, 250)  # G = x, B = y
    raw = _png(PIL.Image.fromarray(image))
    out = loader_transform(raw, resolution=16, mode="RGB", center_crop=False, random_flip=True)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[..., 0].min() >= 249  # constant channel stays constant through resize (no normalisation here)
    gray = loader_transform(raw, resolution=16, mode="L", center_crop=True, random_flip=False)
    assert gray.shape == (16, 16, 1)
    # The resize comes before the crop: 37x50 -> 16x21 (torchvision's Resize(16)), then a 16x16 centre crop of
    # its columns 2..17 (round(5 / 2) = 2), with no flip.
    resized = np.asarray(resize_shorter_side(PIL.Image.fromarray(image), 16))
    assert resized.shape == (16, 21, 3)
    np.testing.assert_array_equal(
        loader_transform(raw, resolution=16, mode="RGB", center_crop=True, random_flip=False), resized[:, 2:18]
    )


def test_modes_rgba_palette_cmyk_gray_to_rgb():
    rgba = np.concatenate([gradient(8, 8, 200), np.zeros((8, 8, 1), np.uint8)], -1)
    out = np.asarray(convert_mode(decode_image(_png(PIL.Image.fromarray(rgba, "RGBA"))), "RGB"))
    np.testing.assert_array_equal(out, rgba[..., :3])  # alpha dropped, as diffusers' convert("RGB")
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = np.asarray(convert_mode(PIL.Image.fromarray(gray, "L"), "RGB"))
    assert out.shape == (8, 8, 3) and (out == gray[..., None]).all()
    palette = PIL.Image.fromarray(gradient(8, 8, 30)).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=8)
    palette.info["transparency"] = 0
    import warnings

    with warnings.catch_warnings(record=True) as with_warnings:
        warnings.simplefilter("always")
        out = convert_mode(palette, "RGB")
    assert out.mode == "RGB" and not with_warnings
    cmyk = PIL.Image.fromarray(gradient(8, 8, 30)).convert("CMYK")
    assert convert_mode(cmyk, "RGB").mode == "RGB"
    assert np.asarray(convert_mode(PIL.Image.fromarray(gradient(8, 8, 30)), "L")).shape == (8, 8)


def test_16bit_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    image = decode_image(_png(PIL.Image.fromarray(values)))
    assert image.mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(convert_mode(image, "L")), [[0, 1, 128, 255]])
    rgb = np.asarray(convert_mode(image, "RGB"))
    np.testing.assert_array_equal(rgb[..., 1], [[0, 1, 128, 255]])
    np.testing.assert_array_equal(np.asarray(decode_image(values)), [[0, 1, 128, 255]])  # uint16 arrays too


def test_exif_orientation_applied_like_datasets():
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    PIL.Image.fromarray(gradient(20, 36, 1)).save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue()).size == (20, 36)  # (W, H) after the 90° rotation
    assert load_resized(buf.getvalue(), 16, "RGB").shape == (28, 16, 3)


def test_decode_accepts_dataset_records_and_rejects_garbage(tmp_path):
    png = _png(PIL.Image.fromarray(gradient(5, 6, 1)))
    path = tmp_path / "x.png"
    path.write_bytes(png)
    for raw in (png, {"bytes": png, "path": None}, {"bytes": None, "path": str(path)}, str(path), gradient(5, 6, 1)):
        assert decode_image(raw).size == (6, 5)
    with pytest.raises(OSError):  # PIL's UnidentifiedImageError
        decode_image(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(ValueError, match="None"):
        decode_image(None)
    assert issubclass(BadImageError, ValueError)


def test_image_mode():
    assert image_mode(3) == "RGB" and image_mode(1) == "L"
    with pytest.raises(ValueError, match="in_channels must be 1 .* or 3 .* got 4"):
        image_mode(4)


# --- preserve_input_precision: diffusers' precision path (PR #12596), re-derived in torch ----------------------


def diffusers_precision_path(decoded: np.ndarray, resolution: int, channels: int = 3) -> np.ndarray:
    """train_unconditional.py with --preserve_input_precision --center_crop on an image PIL decoded to
    ``decoded``: PILToTensor → 1 channel repeated to 3 → ConvertImageDtype(float32) (integers / their type's
    max) → Resize(BILINEAR, antialias) → CenterCrop → Normalize([0.5], [0.5]). Returns (H, W, C) in [-1, 1]."""
    import torch

    x = torch.from_numpy(np.array(decoded))  # a writable copy
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    if x.shape[0] == 1 and channels == 3:
        x = x.repeat(3, 1, 1)
    x = x.float() if x.dtype.is_floating_point else x.float() / torch.iinfo(x.dtype).max
    resized = torch_resize(x.permute(1, 2, 0).numpy(), resolution)
    h, w = resized.shape[:2]
    top, left = round((h - resolution) / 2.0), round((w - resolution) / 2.0)  # torchvision's CenterCrop
    return (resized[top : top + resolution, left : left + resolution] - 0.5) / 0.5


def _precise(raw, resolution: int, mode: str = "RGB", preserve_input_precision: bool = True) -> np.ndarray:
    out = loader_transform(
        raw,
        resolution=resolution,
        mode=mode,
        center_crop=True,
        random_flip=False,
        preserve_input_precision=preserve_input_precision,
    )
    return out.astype(np.float64) / np.iinfo(out.dtype).max * 2 - 1  # what the step feeds the model


def _encoded(array: np.ndarray, format: str) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, format=format)
    return buf.getvalue()


# uint16 rounding is 0.5 / 65535 of the [0, 1] range, 1.5e-5 in [-1, 1]; torch and PIL resize in float32 agree
# to ~1e-6 of the range. The 8-bit path is off by up to 1/255 (7.8e-3) — the precision the flag keeps.
PRECISE_ATOL = 2e-5


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_16bit_png_follows_diffusers_precision_path(mode):
    values = np.random.default_rng(0).integers(0, 65536, (37, 50), dtype=np.uint16)
    png = _encoded(values, "PNG")
    decoded = np.asarray(PIL.Image.open(io.BytesIO(png)))
    assert decoded.dtype == np.uint16  # what PILToTensor sees
    reference = diffusers_precision_path(decoded, 16, channels=3 if mode == "RGB" else 1)
    ours = _precise(png, 16, mode)
    assert ours.shape == reference.shape == (16, 16, 3 if mode == "RGB" else 1)
    assert np.abs(ours - reference).max() < PRECISE_ATOL
    assert (
        loader_transform(
            png, resolution=16, mode=mode, center_crop=True, random_flip=False, preserve_input_precision=True
        ).dtype
        == np.uint16
    )
    assert np.abs(_precise(png, 16, mode, preserve_input_precision=False) - reference).max() > 1e-3


def test_levels_closer_than_8_bits_stay_apart():
    ramp = (30000 + np.arange(16 * 16).reshape(16, 16)).astype(np.uint16)  # 256 levels within one 8-bit step
    png = _encoded(ramp, "PNG")
    out = loader_transform(
        png, resolution=16, mode="L", center_crop=True, random_flip=False, preserve_input_precision=True
    )
    np.testing.assert_array_equal(out[..., 0], ramp)  # no resize at 16: every level exactly
    eight_bit = load_resized(png, 16, "L")
    assert len(np.unique(eight_bit)) <= 2


def test_float_tiff_and_16bit_rgb_arrays_follow_the_precision_path():
    rng = np.random.default_rng(1)
    floats = rng.random((30, 20), dtype=np.float32)
    tiff = _encoded(floats, "TIFF")
    assert PIL.Image.open(io.BytesIO(tiff)).mode == "F"
    assert np.abs(_precise(tiff, 16) - diffusers_precision_path(floats, 16)).max() < PRECISE_ATOL
    rgb16 = rng.integers(0, 65536, (24, 40, 3), dtype=np.uint16)  # a datasets Array3D column, say
    assert np.abs(_precise(rgb16, 16) - diffusers_precision_path(rgb16, 16)).max() < PRECISE_ATOL


def test_8bit_images_take_the_precision_path_without_8bit_rounding():
    image = np.random.default_rng(2).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    png = _encoded(image, "PNG")
    reference = diffusers_precision_path(image, 16)
    assert np.abs(_precise(png, 16) - reference).max() < PRECISE_ATOL
    # without the flag: the same image within the one 8-bit level PIL's uint8 resize rounds to
    assert np.abs(_precise(png, 16, preserve_input_precision=False) - reference).max() < 2 / 255


def test_rgb_16bit_array_for_a_grayscale_model_is_pils_l_conversion():
    # An RGB array whose 16-bit levels are 8-bit ones scaled exactly (x 257): the L channel is PIL's own RGB -> L
    # (ITU-R 601 luma) of the 8-bit image, kept unrounded, so within half an 8-bit level of what PIL rounds to.
    rgb8 = np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = loader_transform(
        rgb8.astype(np.uint16) * 257,
        resolution=16,
        mode="L",
        center_crop=True,
        random_flip=False,
        preserve_input_precision=True,
    )
    assert out.shape == (16, 16, 1) and out.dtype == np.uint16
    pil_l = np.asarray(PIL.Image.fromarray(rgb8).convert("L"), np.float64) / 255
    assert np.abs(out[..., 0] / 65535 - pil_l).max() <= 0.5 / 255 + 1 / 65535
