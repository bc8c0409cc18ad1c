"""Sample images from a diffusers DDPMPipeline (a folder or a Hub repo id) or a training checkpoint.

python -m uncond_flax.sample --pipeline ddpm-ema-flowers-64 --num_images 16 --output grid.png
python -m uncond_flax.sample --pipeline google/ddpm-cifar10-32 --num_images 50000 --batch_size 1000 --output_dir fid
python -m uncond_flax.sample --checkpoint ddpm-ema-flowers-64/checkpoints --num_images 64 --output grid.png
python -m uncond_flax.sample --demo demo-output   # offline: export a tiny random pipeline, load it, sample

--output_dir DIR writes DIR/images/000000.png ... and DIR/samples.npz (uint8, key arr_0, shape (N, H, W, C)): what
FID tools (torch-fidelity, clean-fid, the guided-diffusion evaluator) read. Image i's noise depends only on --seed
and i, never on --batch_size or the device count; the images agree up to the model's float32 rounding, which XLA
may order differently for another batch shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

PROG = "uncond_flax.sample"
NPZ_NAME = "samples.npz"
IMAGES_DIR = "images"


class UsageError(ValueError):
    """A bad argument or path, found before anything compiles; the message is one line."""


def write_demo_pipeline(out_dir: str, seed: int = 0) -> str:
    """A tiny randomly initialised 32px UNet, exported as a DDPMPipeline folder into out_dir."""
    from flax import nnx

    from uncond_flax.export import save_pipeline
    from uncond_flax.models import FlaxUNet2DModel

    model = FlaxUNet2DModel(
        sample_size=32,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        layers_per_block=1,
        rngs=nnx.Rngs(seed),
    )
    save_pipeline(out_dir, model)
    return out_dir


def _scheduler_from_config(config: Mapping[str, Any] | None, name: str | None) -> Any:
    """The sampler for a pipeline's scheduler config: `name` ("ddpm" or "ddim"), else the class the config names.

    The config's betas and prediction_type carry over either way: DDIM over a DDPM pipeline samples its model.
    """
    from uncond_flax.schedulers import FlaxDDIMScheduler, FlaxDDPMScheduler

    config = dict(config or {})
    class_name = config.get("_class_name", "DDPMScheduler")
    if name is None:
        name = "ddim" if class_name == "DDIMScheduler" else "ddpm"
        if class_name not in ("DDPMScheduler", "DDIMScheduler"):
            print(
                f"{PROG}: the pipeline's {class_name} is not implemented here; sampling with DDPM over its "
                "schedule (--scheduler ddim for DDIM)",
                file=sys.stderr,
            )
    if name == "ddim":
        config.pop("variance_type", None)  # DDPM-only
        return FlaxDDIMScheduler.from_config(config)
    return FlaxDDPMScheduler.from_config(config)


def image_noise(
    seed: jax.Array | int, index_B: jax.Array, image_shape: tuple[int, int, int]
) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """(x_T of each image, its step-noise function): image i's noise comes from fold_in(key(seed), i) alone.

    x_T = normal(split(k_i)[0]); the noise of step j (0-based, as the scan counts) = normal(fold_in(split(k_i)[1], j)).
    """
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(jax.random.key(seed), i)))(index_B)
    init_B, steps_B = keys[:, 0], keys[:, 1]
    x_T = jax.vmap(lambda k: jax.random.normal(k, image_shape, jnp.float32))(init_B)

    def step_noise(j):
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, j), image_shape, jnp.float32))(steps_B)

    return x_T, step_noise


def make_sampler(
    model: Any, scheduler: Any, *, num_inference_steps: int, eta: float, mesh: Mesh, image_shape: tuple[int, int, int]
) -> Callable[[int, np.ndarray], jax.Array]:
    """A jitted `(seed, index_B) -> images_BHWC in [0, 1]`: image index_B[b] from its own noise stream, the batch
    sharded over the mesh (B a multiple of its batch shards). One compile serves every batch and seed."""
    from flax import nnx

    from uncond_flax.parallel import batch_sharding, replicated
    from uncond_flax.sampling import reverse_process

    scheduler = scheduler.set_timesteps(num_inference_steps)
    scheduler = jax.device_put(jax.tree.map(np.asarray, scheduler), replicated(mesh))
    graphdef, state = nnx.split(model)
    batch = batch_sharding(mesh)

    def run(state, scheduler, seed, index_B):
        x_T, step_noise = image_noise(seed, index_B, image_shape)
        x_T = jax.lax.with_sharding_constraint(x_T, batch)
        x = reverse_process(nnx.merge(graphdef, state), scheduler, x_T, step_noise, eta)
        return jnp.clip(x / 2 + 0.5, 0.0, 1.0)

    compiled = jax.jit(run, in_shardings=(None, replicated(mesh), replicated(mesh), batch), out_shardings=batch)

    def sample(seed: int, index_B: np.ndarray) -> jax.Array:
        return compiled(state, scheduler, np.uint32(seed), jax.device_put(np.asarray(index_B, np.int32), batch))

    return sample


class NpzWriter:
    """Writes `arr_0` of an .npz one batch at a time (N images never sit in memory); the file appears, under
    its name, only once complete."""

    def __init__(self, path: str, shape: tuple[int, ...]):
        self.path, self.shape, self.written = path, shape, 0
        self._tmp = f"{path}.partial"
        self._zip = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._member = self._zip.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self._member, header)

    def write(self, images_BHWC: np.ndarray) -> None:
        self._member.write(np.ascontiguousarray(images_BHWC, np.uint8).tobytes())
        self.written += len(images_BHWC)

    def close(self) -> None:
        self._member.close()
        self._zip.close()
        if self.written == self.shape[0]:
            os.replace(self._tmp, self.path)
        else:
            os.remove(self._tmp)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pipeline", help="DDPMPipeline folder, unet folder's parent, or Hub repo id")
    source.add_argument("--checkpoint", help="a training checkpoint: step dir (…/checkpoints/1500) or checkpoints dir")
    source.add_argument("--demo", metavar="DIR", help="write a tiny random pipeline to DIR, then sample from it")
    parser.add_argument("--raw", action="store_true", help="with --checkpoint: the raw weights, not the EMA weights")
    parser.add_argument("--num_images", type=_positive, default=16)
    parser.add_argument("--batch_size", type=_positive, default=None, help="images per jitted call (default: ≤ 64)")
    parser.add_argument(
        "--num_inference_steps", type=_positive, default=None, help="default: every training step (ddpm), 50 (ddim)"
    )
    parser.add_argument("--scheduler", choices=["ddpm", "ddim"], default=None, help="default: the pipeline's")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", default=None, help="grid PNG (default without --output_dir: <pipeline>/samples.png)"
    )
    parser.add_argument("--output_dir", default=None, help=f"per-image PNGs in DIR/{IMAGES_DIR}/ and DIR/{NPZ_NAME}")
    parser.add_argument("--overwrite", action="store_true", help="replace the samples already in --output_dir")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if args.raw and not args.checkpoint:
        raise UsageError("--raw applies to --checkpoint only")
    if args.eta < 0:
        raise UsageError(f"--eta {args.eta}: must be >= 0")
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed {args.seed}: must be in [0, 2**32)")
    if args.pipeline and _missing_folder(args.pipeline):
        raise UsageError(f"--pipeline {args.pipeline}: no such folder (give a pipeline folder or a Hub repo id)")


def _missing_folder(pipeline: str) -> bool:
    """A local path that is not a folder; a Hub repo id is "name" or "org/name" and URLs are checked on reading."""
    from uncond_flax import storage

    if storage.is_remote(pipeline) or os.path.isdir(pipeline):
        return False
    return os.path.exists(pipeline) or pipeline.startswith((".", "/", "~")) or pipeline.count("/") > 1


def _check_output_dir(output_dir: str, overwrite: bool) -> tuple[str, list[str]]:
    """(DIR/images, the earlier samples there that --overwrite replaces): stale images would join an FID set."""
    images_dir = os.path.join(output_dir, IMAGES_DIR)
    npz = os.path.join(output_dir, NPZ_NAME)
    old = [os.path.join(images_dir, f) for f in os.listdir(images_dir)] if os.path.isdir(images_dir) else []
    old = [path for path in old if path.endswith(".png")] + ([npz] if os.path.exists(npz) else [])
    if old and not overwrite:
        raise UsageError(f"--output_dir {output_dir} already holds samples; pass --overwrite or choose another folder")
    os.makedirs(images_dir, exist_ok=True)  # an unwritable folder fails here, before anything compiles
    return images_dir, old


def _load(args: argparse.Namespace, mesh: Mesh) -> tuple[Any, dict | None, str | None]:
    """(model, scheduler config, a local folder for the default grid or None)."""
    from uncond_flax.export import load_scheduler_config, load_unet

    if args.checkpoint:
        from uncond_flax.config import noise_scheduler_for
        from uncond_flax.convert import restore_checkpoint_model

        model, config, step = restore_checkpoint_model(args.checkpoint, use_ema=not args.raw, mesh=mesh)
        print(f"{PROG}: checkpoint {step} ({'raw' if args.raw else 'EMA'} weights)", file=sys.stderr)
        return model, noise_scheduler_for(config).to_config(), None
    pipeline = write_demo_pipeline(args.demo) if args.demo else args.pipeline
    folder = pipeline if os.path.isdir(pipeline) else None
    return load_unet(pipeline), load_scheduler_config(pipeline), folder


@dataclasses.dataclass
class _Plan:
    model: Any
    scheduler: Any
    steps: int
    image_shape: tuple[int, int, int]
    grid: str | None
    images_dir: str | None
    stale: list[str]  # removed once everything else checked out: a failed start loses nothing


def _plan(args: argparse.Namespace, mesh: Mesh) -> _Plan:
    """Everything checked and loaded, nothing compiled; bad arguments and paths raise ValueError or OSError."""
    from uncond_flax.parallel import is_main_process

    _check_args(args)
    if args.demo:
        args.scheduler = args.scheduler or "ddim"
        args.num_inference_steps = args.num_inference_steps or 20
    images_dir, stale = _check_output_dir(args.output_dir, args.overwrite) if args.output_dir else (None, [])
    model, scheduler_config, folder = _load(args, mesh)
    scheduler = _scheduler_from_config(scheduler_config, args.scheduler)
    from uncond_flax.schedulers import FlaxDDIMScheduler

    is_ddim = isinstance(scheduler, FlaxDDIMScheduler)
    if args.eta and not is_ddim:
        raise UsageError("--eta applies to DDIM only; add --scheduler ddim")
    steps = args.num_inference_steps or (50 if is_ddim else scheduler.num_train_timesteps)
    scheduler.set_timesteps(steps)  # a step count the schedule cannot take fails here
    size = model.config["sample_size"]
    if size is None:
        raise UsageError("the UNet's config has no sample_size, so the image size is unknown")
    image_shape = (*((size, size) if isinstance(size, int) else tuple(size)), model.config["in_channels"])
    grid = args.output or (None if args.output_dir else os.path.join(folder or ".", "samples.png"))
    if grid and is_main_process():
        os.makedirs(os.path.dirname(os.path.abspath(grid)), exist_ok=True)
    return _Plan(model, scheduler, steps, image_shape, grid, images_dir, stale)


def _sample(args: argparse.Namespace, plan: _Plan, mesh: Mesh) -> str:
    """Sample every batch and write the outputs; returns the summary line."""
    from tqdm.auto import tqdm

    from uncond_flax.images import save_grid, to_uint8
    from uncond_flax.parallel import is_main_process, num_batch_shards, to_host

    if is_main_process():
        for path in plan.stale:
            os.remove(path)
    n = args.num_images
    batch = min(args.batch_size or 64, n)
    shards = num_batch_shards(mesh)
    padded = -(-batch // shards) * shards  # every call the same shape: one compile; extra rows are discarded
    sample = make_sampler(
        plan.model,
        plan.scheduler,
        num_inference_steps=plan.steps,
        eta=args.eta,
        mesh=mesh,
        image_shape=plan.image_shape,
    )
    npz = NpzWriter(os.path.join(args.output_dir, NPZ_NAME), (n, *plan.image_shape)) if plan.images_dir else None
    digits = max(6, len(str(n - 1)))
    kept = []  # batches for the grid
    tty = sys.stderr.isatty()
    bar = tqdm(total=n, unit="img", desc=PROG, disable=not tty, file=sys.stderr)
    start = first = time.perf_counter()
    try:
        for b, lo in enumerate(range(0, n, batch)):
            count = min(batch, n - lo)
            images = to_host(sample(args.seed, np.arange(lo, lo + padded)))[:count]
            if b == 0:
                first = time.perf_counter()  # compile + one batch; the rate is measured after it
            if is_main_process():
                if npz:
                    uint8 = to_uint8(images)
                    npz.write(uint8)
                    for i, image in enumerate(uint8):
                        _save_png(image, os.path.join(plan.images_dir, f"{lo + i:0{digits}d}.png"))
                if plan.grid:
                    kept.append(images)
            bar.update(count)
            if not tty:  # CI, nohup, SLURM: a line per batch, not tqdm's carriage returns
                print(f"{PROG}: {lo + count}/{n} images ({time.perf_counter() - start:.1f}s)", file=sys.stderr)
    finally:
        bar.close()
        if npz:
            npz.close()
    seconds = time.perf_counter() - start
    rate = f", then {(n - batch) / (time.perf_counter() - first):.1f} img/s" if n > batch else ""
    if plan.grid and is_main_process():
        save_grid(np.concatenate(kept), plan.grid)
    outputs = ", ".join(p for p in (plan.grid, args.output_dir) if p)
    return (
        f"{n} images, {plan.steps} {type(plan.scheduler).__name__} steps, batches of {batch} on "
        f"{jax.device_count()} {jax.default_backend()} device(s) in {seconds:.1f}s{rate} -> {outputs}"
    )


def _save_png(image_HWC: np.ndarray, path: str) -> None:
    from PIL import Image

    Image.fromarray(image_HWC[..., 0] if image_HWC.shape[-1] == 1 else image_HWC).save(path)


def main(argv: list[str] | None = None) -> int:
    from uncond_flax.cli import quiet_library_tracebacks
    from uncond_flax.compile_cache import enable_compile_cache
    from uncond_flax.errors import one_line
    from uncond_flax.parallel import make_mesh

    args = _parser().parse_args(argv)
    quiet_library_tracebacks()
    enable_compile_cache("auto")  # a second sampling run of the same model loads its compiled sampler
    mesh = make_mesh()
    try:
        plan = _plan(args, mesh)
    except (ValueError, OSError) as e:
        sys.exit(f"{PROG}: error: {one_line(e)}")
    try:
        print(_sample(args, plan, mesh))
    except OSError as e:  # a full disk or a vanished folder while writing
        sys.exit(f"{PROG}: error: {one_line(e)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
