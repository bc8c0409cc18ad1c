"""Sample a PNG grid from a diffusers DDPMPipeline folder (or Hub id) with the jitted Flax sampler.

python -m uncond_flax.sample --pipeline ddpm-ema-flowers-64 --num_images 16 --output samples.png
python -m uncond_flax.sample --demo demo-output   # offline: export a tiny random pipeline, load it, sample
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax


def _scheduler(pipeline_dir: str, name: str | None):
    from uncond_flax.schedulers import FlaxDDIMScheduler, FlaxDDPMScheduler

    path = os.path.join(pipeline_dir, "scheduler", "scheduler_config.json")
    config = json.load(open(path)) if os.path.isfile(path) else {}
    cls = {"ddpm": FlaxDDPMScheduler, "ddim": FlaxDDIMScheduler}[name or "ddpm"]
    if name is None and config.get("_class_name") == "DDIMScheduler":
        cls = FlaxDDIMScheduler
    if cls is FlaxDDIMScheduler:
        config.pop("variance_type", None)  # DDPM-only; sampling a DDPM pipeline with DDIM is intended here
    return cls.from_config(config)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pipeline", help="DDPMPipeline folder, unet folder's parent, or Hub repo id")
    source.add_argument("--demo", metavar="DIR", help="write a tiny random pipeline to DIR, then sample from it")
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--num_inference_steps", type=int, default=None, help="default: 1000 (ddpm), 50 (ddim)")
    parser.add_argument("--scheduler", choices=["ddpm", "ddim"], default=None, help="default: the pipeline's")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="PNG path (default: <pipeline>/samples.png)")
    args = parser.parse_args(argv)

    from uncond_flax.export import load_unet
    from uncond_flax.images import save_grid
    from uncond_flax.sampling import sample_images

    pipeline = write_demo_pipeline(args.demo) if args.demo else args.pipeline
    if args.demo:
        args.scheduler = args.scheduler or "ddim"
        args.num_inference_steps = args.num_inference_steps or 20
    model = load_unet(pipeline)
    scheduler = _scheduler(pipeline, args.scheduler) if os.path.isdir(pipeline) else _scheduler("", args.scheduler)
    steps = args.num_inference_steps or (50 if type(scheduler).__name__ == "FlaxDDIMScheduler" else 1000)
    start = time.perf_counter()
    images = sample_images(
        model,
        scheduler,
        batch_size=args.num_images,
        num_inference_steps=steps,
        key=jax.random.key(args.seed),
        eta=args.eta,
    )
    seconds = time.perf_counter() - start
    output = args.output or os.path.join(pipeline if os.path.isdir(pipeline) else ".", "samples.png")
    save_grid(images, output)
    print(
        f"{args.num_images} images, {steps} {type(scheduler).__name__} steps on {jax.device_count()} "
        f"{jax.default_backend()} device(s) in {seconds:.1f}s -> {output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
