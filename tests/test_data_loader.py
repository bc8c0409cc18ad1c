"""The grain loader: global sharded batches, determinism, per-process sharding, save/restore, bad images, cache."""

import json
import logging
import os
import re

import jax
import numpy as np
import PIL.Image
import pytest
from fixtures.data_factory import TFDS_DIR, TFDS_NAME, data_config, gradient, make_image_folder
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from uncond_flax.data import (
    BadImageError,
    TrainLoader,
    build_train_loader,
    check_resolution,
    process_rows,
)
from uncond_flax.parallel import BATCH_AXES, make_mesh


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8  # conftest: 8 simulated CPU devices
    return make_mesh()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """33 non-square images (31 RGB of varying size + modes): random crops really move."""
    root = tmp_path_factory.mktemp("data")
    make_image_folder(str(root / "imgs"), n_rgb=26)
    return {"train_data_dir": str(root / "imgs"), "cache_dir": str(root / "cache")}


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    make_image_folder(str(root / "imgs"), n_rgb=9, corrupt=True)
    return {"train_data_dir": str(root / "imgs"), "cache_dir": str(root / "cache")}


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """24 flat 16×16 RGB PNGs whose red value is 10 × their index (imagefolder reads them in sorted order)."""
    root = tmp_path_factory.mktemp("numbered")
    for i in range(24):
        PIL.Image.fromarray(np.full((16, 16, 3), (10 * i, 7, 9), np.uint8)).save(root / f"{i:02d}.png")
    return str(root)


def corrupt_index(folder: dict) -> int:
    return sorted(os.listdir(folder["train_data_dir"])).index("corrupt.jpg")  # imagefolder keeps sorted order


def take(loader: TrainLoader, n: int) -> list[np.ndarray]:
    return [np.asarray(next(loader)["images"]) for _ in range(n)]


def test_global_batch_shape_dtype_sharding(mesh):
    config = data_config(dataset_name="digits", train_batch_size=2, gradient_accumulation_steps=3, random_flip=True)
    with build_train_loader(config, mesh) as loader:
        batch = next(loader)
        images = batch["images"]
        assert isinstance(images, jax.Array) and images.dtype == np.uint8
        assert images.shape == (3, 16, 16, 16, 3)  # (A, B = 2 per device x 8 devices, H, W, C)
        assert images.sharding.is_equivalent_to(NamedSharding(mesh, P(None, BATCH_AXES)), images.ndim)
        assert {s.data.shape for s in images.addressable_shards} == {(3, 2, 16, 16, 3)}
        assert loader.steps_per_epoch == 1797 // 48 and loader.num_examples == 1797 and loader.examples_per_step == 48
        assert loader.batch_spec(images.sharding) == jax.ShapeDtypeStruct(
            images.shape, np.uint8, sharding=images.sharding
        )
    gray = data_config(dataset_name="digits", in_channels=1, train_batch_size=1)
    with build_train_loader(gray, mesh) as loader:
        assert next(loader)["images"].shape == (1, 8, 16, 16, 1)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_steps_hold_the_documented_shuffle_read_back_from_the_pixels(mesh, numbered, accumulation):
    # The documented order (steps.py): epoch e visits numpy's default_rng([seed, e, 0x5EED]).permutation(N);
    # step s of the epoch takes its next A × B examples as rows of (A, B). Derived here from numpy itself, and
    # each example recognised by its pixels rather than by the loader's own bookkeeping.
    config = data_config(train_data_dir=numbered, center_crop=True, gradient_accumulation_steps=accumulation, seed=7)
    with build_train_loader(config, mesh) as loader:
        per_step, steps_per_epoch = 8 * accumulation, 24 // (8 * accumulation)
        assert loader.steps_per_epoch == steps_per_epoch
        batches = take(loader, 2 * steps_per_epoch)
    for k, images_ABHWC in enumerate(batches):
        assert images_ABHWC.shape == (accumulation, 8, 16, 16, 3)
        assert (images_ABHWC[..., 1] == 7).all() and (images_ABHWC[..., 2] == 9).all()
        red = images_ABHWC[..., 0]
        assert (red == red[:, :, :1, :1]).all()  # whole images, not mixed
        seen_AB = red[:, :, 0, 0] // 10
        epoch, s = divmod(k, steps_per_epoch)
        order = np.random.default_rng([7, epoch, 0x5EED]).permutation(24)
        np.testing.assert_array_equal(seen_AB, order[s * per_step : (s + 1) * per_step].reshape(accumulation, 8))
    if steps_per_epoch == 3:  # every example exactly once per epoch, in a new order the next epoch
        seen = [b[..., 0, 0, 0].ravel() // 10 for b in batches]
        first, second = np.concatenate(seen[:3]), np.concatenate(seen[3:])
        assert sorted(first) == sorted(second) == list(range(24)) and list(first) != list(second)


def test_checks_before_anything_heavy(mesh):
    with pytest.raises(ValueError, match=r"resolution 60 is not divisible by the UNet's downsampling factor 32"):
        check_resolution(60, (128, 128, 256, 256, 512, 512))
    # resolution is checked before the (missing) dataset is even looked up
    with pytest.raises(ValueError, match="resolution 17 is not divisible"):
        build_train_loader(data_config(dataset_name="no/such-dataset", resolution=17), mesh)
    with pytest.raises(
        ValueError,
        match=r"digits has 1797 examples, fewer than one optimizer step of 2048 "
        r"\(train_batch_size 128 × 8 devices × gradient_accumulation_steps 2\)",
    ):
        build_train_loader(
            data_config(dataset_name="digits", train_batch_size=128, gradient_accumulation_steps=2), mesh
        )


def test_same_seed_same_batches_and_worker_count_does_not_matter(mesh, folder):
    base = dict(folder, center_crop=False, random_flip=True, train_batch_size=1, seed=7)
    with build_train_loader(data_config(**base, dataloader_num_workers=0), mesh) as loader:
        assert loader.steps_per_epoch == 4
        first = take(loader, 6)  # crosses an epoch boundary
    with build_train_loader(data_config(**base, dataloader_num_workers=0), mesh, device_prefetch=0) as loader:
        np.testing.assert_array_equal(np.stack(take(loader, 6)), np.stack(first))
    with build_train_loader(data_config(**base, dataloader_num_workers=2), mesh) as loader:
        np.testing.assert_array_equal(np.stack(take(loader, 6)), np.stack(first))
    with build_train_loader(data_config(**dict(base, seed=8)), mesh) as loader:
        assert not np.array_equal(take(loader, 1)[0], first[0])
    # epoch 1 re-shuffles and re-draws crops/flips
    assert not np.array_equal(first[4], first[0])


def test_two_processes_split_every_batch_without_overlap(mesh, folder):
    config = data_config(**folder, gradient_accumulation_steps=2, random_flip=True)
    with build_train_loader(config, mesh) as whole:
        global_batches = take(whole, whole.steps_per_epoch)
        layout = whole.layout
    parts, seen = [], []
    for p in range(2):
        with build_train_loader(config, mesh, process_index=p, process_count=2) as loader:
            assert loader.layout.rows == tuple(range(4 * p, 4 * p + 4))
            parts.append(take(loader, loader.steps_per_epoch))
            assert parts[p][0].shape == (2, 4, 16, 16, 3) and isinstance(parts[p][0], np.ndarray)
            seen.append(np.concatenate([loader.layout.local_indices(s).ravel() for s in range(loader.steps_per_epoch)]))
    # the processes' parts side by side are exactly the single-process global batch
    for step, global_batch in enumerate(global_batches):
        np.testing.assert_array_equal(np.concatenate([parts[0][step], parts[1][step]], axis=1), global_batch)
    # over one epoch: no example read twice, by one process or by both
    assert len(set(seen[0]) & set(seen[1])) == 0
    union = np.concatenate(seen)
    assert len(np.unique(union)) == len(union) == layout.steps_per_epoch * layout.examples_per_step


def test_save_restore_mid_epoch_gives_identical_following_batches(mesh, folder):
    config = data_config(**folder, random_flip=True, train_batch_size=1)
    with build_train_loader(config, mesh) as loader:
        take(loader, 3)
        state = json.loads(json.dumps(loader.get_state()))  # what a checkpoint stores
        expected = take(loader, 5)  # runs into the next epoch
    assert state["global_step"] == 3 and state["epoch"] == 0 and state["step_in_epoch"] == 3
    # a fresh run restores it (here with workers: the worker count may change across a restart)
    with build_train_loader(
        data_config(**folder, random_flip=True, train_batch_size=1, dataloader_num_workers=2), mesh
    ) as resumed:
        resumed.set_state(state)
        assert (resumed.epoch, resumed.step_in_epoch) == (0, 3)
        np.testing.assert_array_equal(np.stack(take(resumed, 5)), np.stack(expected))
    # the same loader rewound in place after it has prefetched ahead
    with build_train_loader(config, mesh) as loader:
        take(loader, 6)
        loader.set_state(state)
        np.testing.assert_array_equal(np.stack(take(loader, 5)), np.stack(expected))
        with pytest.raises(ValueError, match=r"does not match this run: global_batch_size 16 \(now 8\)"):
            loader.set_state({**state, "global_batch_size": 16})


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_image_error_is_one_line_naming_the_file_and_what_to_do(mesh, bad_folder, workers):
    config = data_config(**bad_folder, train_batch_size=1, dataloader_num_workers=workers)
    with build_train_loader(config, mesh) as loader:
        index = corrupt_index(bad_folder)
        with pytest.raises(BadImageError) as info:
            take(loader, loader.steps_per_epoch)
        message = str(info.value)
        assert re.fullmatch(
            rf".*imgs: cannot decode example {index} \(.*corrupt\.jpg\): UnidentifiedImageError: .*; "
            r"fix or remove that file, or set skip_bad_images=True to train on the other images",
            message,
        )
        assert "\n" not in message
        # raised afresh in the consumer, grain's note left on the worker's error: a traceback ends with our line
        assert not getattr(info.value, "__notes__", None)
        assert isinstance(info.value.__cause__, BadImageError) and str(info.value.__cause__) == message
        failed_at = loader.global_step
        with pytest.raises(BadImageError):  # raises again (rebuilt at the same step), never hangs
            next(loader)
        assert loader.global_step == failed_at


def test_skip_bad_images_counts_and_logs(mesh, bad_folder, caplog):
    config = data_config(**bad_folder, train_batch_size=1, skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="uncond_flax.data"), build_train_loader(config, mesh) as loader:
        batches = take(loader, 3 * loader.steps_per_epoch)
        assert loader.num_skipped_images == 1 and loader.get_state()["skipped_indices"] == [corrupt_index(bad_folder)]
    assert all(b.shape == (1, 8, 16, 16, 3) for b in batches)
    assert any("skipped bad image (1 so far)" in r.message and "corrupt.jpg" in r.message for r in caplog.records)
    assert any("skipped 1 bad images in total" in r.message for r in caplog.records)
    assert min(b.reshape(-1, 16 * 16 * 3).max(axis=1).min() for b in batches) > 0  # never a black image


def test_decode_cache_gives_the_same_batches(mesh, folder, bad_folder):
    base = dict(folder, random_flip=True, train_batch_size=1)
    with build_train_loader(data_config(**base), mesh) as loader:
        expected = take(loader, 5)
    for _ in range(2):  # build, then reuse
        with build_train_loader(data_config(**base, decode_cache=True), mesh) as loader:
            np.testing.assert_array_equal(np.stack(take(loader, 5)), np.stack(expected))
    caches = os.listdir(os.path.join(folder["cache_dir"], "uncond_flax_decode_cache"))
    assert len([c for c in caches if not c.startswith(".tmp")]) == 1 and not any(c.startswith(".tmp") for c in caches)
    bad = bad_folder
    with pytest.raises(
        BadImageError, match=rf"cannot decode example {corrupt_index(bad_folder)} \(.*corrupt\.jpg\): .*skip_bad_images"
    ):
        build_train_loader(data_config(**bad, decode_cache=True), mesh)
    with build_train_loader(
        data_config(**bad, decode_cache=True, skip_bad_images=True, train_batch_size=1), mesh
    ) as loader:
        take(loader, 2 * loader.steps_per_epoch)
        assert loader.num_skipped_images == 1


@pytest.mark.parametrize("damage", ["truncated data.bin", "no index.npy", "garbled meta.json"])
def test_damaged_decode_cache_is_built_again(mesh, folder, tmp_path, caplog, damage):
    base = dict(folder, cache_dir=str(tmp_path), random_flip=True, train_batch_size=1)
    with build_train_loader(data_config(**base), mesh) as loader:
        expected = take(loader, 3)
    build_train_loader(data_config(**base, decode_cache=True), mesh).close()
    root = tmp_path / "uncond_flax_decode_cache"
    (cache,) = os.listdir(root)
    data = root / cache / "data.bin"
    if damage == "truncated data.bin":
        os.truncate(data, os.path.getsize(data) - 100)
    elif damage == "no index.npy":
        os.remove(root / cache / "index.npy")
    else:
        (root / cache / "meta.json").write_text('{"chan')
    cached = data_config(**base, decode_cache=True)
    with caplog.at_level(logging.WARNING, logger="uncond_flax.data"), build_train_loader(cached, mesh) as loader:
        np.testing.assert_array_equal(np.stack(take(loader, 3)), np.stack(expected))
    (warning,) = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert cache in warning and warning.endswith("building it again")
    if damage == "truncated data.bin":
        assert f"data.bin has {os.path.getsize(data) - 100} bytes, its index needs {os.path.getsize(data)}" in warning
    assert os.listdir(root) == [cache]  # rebuilt in place; the damaged copy is gone


def test_preserve_input_precision_delivers_uint16_batches(mesh, tmp_path):
    # 16-bit gray PNGs at the training resolution (no resize): levels 1 apart, far below one 8-bit step
    os.makedirs(tmp_path / "gray16")  # datasets would take a split name from the pytest folder's name
    for i in range(16):
        values = (20000 + 300 * i + np.arange(16 * 16)).reshape(16, 16).astype(np.uint16)
        PIL.Image.fromarray(values).save(tmp_path / "gray16" / f"{i:02d}.png")
    base = {"train_data_dir": str(tmp_path / "gray16"), "cache_dir": str(tmp_path / "cache"), "center_crop": True}
    with build_train_loader(data_config(**base, preserve_input_precision=True), mesh) as loader:
        images = next(loader)["images"]
        assert images.dtype == np.uint16 and images.shape == (1, 8, 16, 16, 3)
        assert loader.batch_spec(images.sharding).dtype == np.uint16
        batch = np.asarray(images)
    for image in batch[0]:
        first = int(image[0, 0, 0])
        assert (first - 20000) % 300 == 0  # one of the files, whole, its gray repeated into R, G and B
        expected = (first + np.arange(16 * 16)).reshape(16, 16)
        np.testing.assert_array_equal(image, np.repeat(expected[..., None], 3, axis=-1))
    for extra in ({"dataloader_num_workers": 2}, {"decode_cache": True}, {"decode_cache": True}):  # build, reuse
        with build_train_loader(data_config(**base, preserve_input_precision=True, **extra), mesh) as loader:
            np.testing.assert_array_equal(np.asarray(next(loader)["images"]), batch)
    with build_train_loader(data_config(**base), mesh) as loader:  # without the flag: 8-bit, as before
        assert next(loader)["images"].dtype == np.uint8


def test_max_steps_and_close(mesh):
    loader = build_train_loader(data_config(dataset_name="digits"), mesh, max_steps=3)
    assert len(list(loader)) == 3
    loader.close()
    loader.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


def test_tfds_source_in_worker_processes(mesh):
    base = {"dataset_name": f"tfds:{TFDS_NAME}", "tfds_data_dir": TFDS_DIR, "random_flip": True}
    with build_train_loader(data_config(**base), mesh) as loader:
        assert loader.steps_per_epoch == 1  # 12 examples, global batch 8
        expected = take(loader, 3)
    with build_train_loader(data_config(**base, dataloader_num_workers=2), mesh) as loader:
        np.testing.assert_array_equal(np.stack(take(loader, 3)), np.stack(expected))
    reds = sorted(int(v) for v in np.unique(expected[0][..., 0]))
    assert len(reds) == 8 and all(v % 20 == 0 for v in reds)  # 8 distinct examples (red = 20 * index)


def test_process_rows(mesh):
    assert process_rows(mesh, 16, 0, 1) == (tuple(range(16)), True)  # the real single-process layout
    assert process_rows(make_mesh(fsdp=2), 8, 0, 1) == (tuple(range(8)), True)
    assert process_rows(mesh, 16, 3, 4) == ((12, 13, 14, 15), False)  # simulated: contiguous equal blocks
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        process_rows(mesh, 16, 0, 3)


def test_set_state_refuses_another_run_and_restores_the_skipped_images(mesh, numbered):
    config = data_config(train_data_dir=numbered, center_crop=True, seed=7)
    with build_train_loader(config, mesh) as loader:
        saved = json.loads(json.dumps(loader.get_state()))
        assert (saved["num_examples"], saved["global_batch_size"], saved["accumulation_steps"]) == (24, 8, 1)
        # A checkpoint's position: step 4 = epoch 1, step 1 of 3; two bad images met before it.
        state = {**saved, "global_step": 4, "epoch": 1, "step_in_epoch": 1, "skipped_indices": [5, 11]}
        for key, other in (("seed", 8), ("num_examples", 25), ("global_batch_size", 16), ("accumulation_steps", 2)):
            with pytest.raises(ValueError, match=rf"does not match this run: {key} {other} \(now {saved[key]}\)"):
                loader.set_state({**state, key: other})
        with pytest.raises(ValueError, match="unknown data loader state version 2"):
            loader.set_state({**state, "version": 2})
        for position in ({"epoch": 0}, {"step_in_epoch": 2}, {"global_step": -1, "epoch": -1, "step_in_epoch": 2}):
            with pytest.raises(ValueError, match="inconsistent data loader state"):
                loader.set_state({**state, **position})
        assert loader.global_step == 0  # nothing refused moved it
        loader.set_state(state)
        assert (loader.global_step, loader.epoch, loader.step_in_epoch) == (4, 1, 1)
        assert loader.num_skipped_images == 2 and loader.get_state()["skipped_indices"] == [5, 11]


def test_crops_and_flips_are_the_documented_draws_read_back_from_the_pixels(mesh, tmp_path):
    # transforms.py: example i in epoch e crops and flips with numpy's default_rng([seed, e, i, 0]): the top offset,
    # the left one, then the flip (p = 0.5), as torchvision's RandomCrop and RandomHorizontalFlip draw them. 16 px
    # tall images need no resize at resolution 16 (top is always 0), so each left offset and flip is read from G = x.
    for i in range(8):
        PIL.Image.fromarray(gradient(16, 28, 10 * i)).save(tmp_path / f"{i}.png")
    config = data_config(train_data_dir=str(tmp_path), center_crop=False, random_flip=True, seed=3)
    with build_train_loader(config, mesh) as loader:
        assert loader.steps_per_epoch == 1
        batches = take(loader, 3)
    flips = 0
    for epoch, images_ABHWC in enumerate(batches):
        for image in images_ABHWC[0]:
            index = int(image[0, 0, 0]) // 10
            rng = np.random.default_rng([3, epoch, index, 0])
            top, left, flip = rng.integers(0, 1), rng.integers(0, 28 - 16 + 1), rng.random() < 0.5
            columns = np.arange(left, left + 16)[::-1] if flip else np.arange(left, left + 16)
            np.testing.assert_array_equal(image, gradient(16, 28, 10 * index)[top:, columns])
            flips += flip
    assert 0 < flips < 24
