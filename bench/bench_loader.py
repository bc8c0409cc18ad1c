"""Loader throughput: our grain loader vs. diffusers' PyTorch DataLoader pipeline, on generated JPEGs.

    python bench/bench_loader.py                       # 300 JPEGs of 500x375, resolution 64, workers 0/1/2
    python bench/bench_loader.py --num-images 600 --workers 0 2 --batch-size 64

Ours: build_train_loader (imagefolder → decode → resize → random crop → flip → uint8 → global jax.Array on the
devices). Baseline: diffusers' train_unconditional.py data path (datasets imagefolder + set_transform +
torch DataLoader(shuffle=True)) with torchvision's transforms if torchvision imports, else the same work done
with PIL + torch (Resize(BILINEAR) → RandomCrop → RandomHorizontalFlip → ToTensor → Normalize).
Not a test: numbers depend on the machine. The train step's own images/s is not measured here yet.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def bench_ours(
    data_dir: str, cache_dir: str, workers: int, batch: int, resolution: int, steps: int, decode_cache: bool = False
) -> float:
    import jax
    from fixtures.data_factory import data_config  # noqa: PLC0415 -- tests/ helpers, also used by the tests

    from uncond_flax.data import build_train_loader
    from uncond_flax.parallel import make_mesh

    mesh = make_mesh()
    per_device = max(1, batch // jax.device_count())
    config = data_config(
        train_data_dir=data_dir,
        cache_dir=cache_dir,
        resolution=resolution,
        train_batch_size=per_device,
        dataloader_num_workers=workers,
        random_flip=True,
        decode_cache=decode_cache,
    )
    config.model.block_out_channels = (128, 128, 256, 256, 512, 512)
    with build_train_loader(config, mesh) as loader:
        for _ in range(2):  # warm-up: worker start-up, first permutation
            next(loader)["images"].block_until_ready()
        start = time.perf_counter()
        for _ in range(steps):
            images = next(loader)["images"]
        images.block_until_ready()
        elapsed = time.perf_counter() - start
        return steps * loader.examples_per_step / elapsed


def _torchvision_transform(resolution: int):
    try:
        from torchvision import transforms
    except Exception:  # noqa: BLE001 -- PyPI's torchvision does not import beside some torch builds
        return None, "PIL loop (no torchvision)"
    return transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.RandomCrop(resolution),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    ), "torchvision"


class _PILAugment:
    """torchvision's Resize → RandomCrop → RandomHorizontalFlip → ToTensor → Normalize, in PIL + torch."""

    def __init__(self, resolution: int):
        self.resolution = resolution

    def __call__(self, image):
        import PIL.Image
        import torch

        w, h = image.size
        r = self.resolution
        size = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
        image = image.resize(size, PIL.Image.Resampling.BILINEAR)
        top = int(torch.randint(0, size[1] - r + 1, (1,)))
        left = int(torch.randint(0, size[0] - r + 1, (1,)))
        image = image.crop((left, top, left + r, top + r))
        if torch.rand(1) < 0.5:
            image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        import numpy as np

        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        return x.sub_(0.5).div_(0.5)


class _TransformImages:
    """diffusers' ``transform_images``: augmentations(image.convert("RGB")) for each image of the batch."""

    def __init__(self, augment):
        self.augment = augment

    def __call__(self, examples):
        return {"input": [self.augment(image.convert("RGB")) for image in examples["image"]]}


def bench_torch(
    data_dir: str, cache_dir: str, workers: int, batch: int, resolution: int, steps: int
) -> tuple[float, str]:
    import datasets
    import torch

    augment, kind = _torchvision_transform(resolution)
    augment = augment or _PILAugment(resolution)
    dataset = datasets.load_dataset("imagefolder", data_dir=data_dir, cache_dir=cache_dir, split="train")
    dataset.set_transform(_TransformImages(augment))
    # spawn, not Linux's default fork: this process already runs JAX's threads (fork could deadlock).
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
        multiprocessing_context="spawn" if workers > 0 else None,
    )
    done, it = 0, iter(loader)

    def next_batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(loader)
            return next(it)

    for _ in range(2):
        next_batch()
    start = time.perf_counter()
    for _ in range(steps):
        done += next_batch()["input"].shape[0]
    return done / (time.perf_counter() - start), kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (split over the JAX devices)")
    parser.add_argument("--steps", type=int, default=20, help="timed batches per configuration")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-dir", default=None, help="reuse a folder of images instead of generating one")
    args = parser.parse_args()

    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from fixtures.data_factory import make_jpeg_folder

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or make_jpeg_folder(os.path.join(tmp, "jpegs"), args.num_images)
        cache_dir = os.path.join(tmp, "hf_cache")
        print(
            f"{len(os.listdir(data_dir))} images in {data_dir}, resolution {args.resolution}, "
            f"global batch {args.batch_size}, {args.steps} timed batches, {os.cpu_count()} CPUs"
        )
        print(f"{'workers':>7} | {'uncond_flax (img/s)':>20} | {'PyTorch DataLoader (img/s)':>27} | ratio")
        for workers in args.workers:
            ours = bench_ours(data_dir, cache_dir, workers, args.batch_size, args.resolution, args.steps)
            theirs, kind = bench_torch(data_dir, cache_dir, workers, args.batch_size, args.resolution, args.steps)
            print(f"{workers:>7} | {ours:>20.0f} | {theirs:>27.0f} | {ours / theirs:5.2f}x   ({kind})", flush=True)
        cached = bench_ours(data_dir, cache_dir, 0, args.batch_size, args.resolution, args.steps, decode_cache=True)
        print(f"{'0+cache':>7} | {cached:>20.0f} | {'':>27} |         (decode_cache=True, built before timing)")
        print("train step images/s: not measured yet (the train step is not written); target: loader >= 3x that")


if __name__ == "__main__":
    main()
