"""Per-example transforms: the values diffusers' torchvision pipeline would produce, before normalisation."""

import io

import numpy as np
import PIL.Image
import pytest
from fixtures.data_factory import gradient

from uncond_flax.data.transforms import (
    BadImageError,
    center_crop_offsets,
    convert_mode,
    crop_and_flip,
    decode_image,
    example_rng,
    image_mode,
    load_resized,
    preprocess,
    random_crop_offsets,
    resize_shorter_side,
    resized_size,
)


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


def test_resize_is_pil_antialiased_bilinear():
    image = PIL.Image.fromarray(gradient(375, 500, 7))
    out = resize_shorter_side(image, 64)
    assert out.size == (85, 64)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(image.resize((85, 64), PIL.Image.Resampling.BILINEAR)))
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
    draw = lambda *key: random_crop_offsets(100, 100, 16, example_rng(*key))  # noqa: E731
    assert draw(1, 2, 3) == draw(1, 2, 3)
    assert len({draw(1, e, 3) for e in range(10)}) > 1  # a new crop every epoch
    assert len({draw(s, 2, 3) for s in range(10)}) > 1


def test_preprocess_range_dtype_shape():
    raw = _png(PIL.Image.fromarray(gradient(37, 50, 250)))
    out = preprocess(raw, resolution=16, mode="RGB", center_crop=False, random_flip=True, rng=example_rng(0, 0, 0))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[..., 0].min() >= 249  # constant channel stays constant through resize (no normalisation here)
    gray = preprocess(raw, resolution=16, mode="L", center_crop=True, random_flip=False, rng=example_rng(0, 0, 0))
    assert gray.shape == (16, 16, 1)


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
