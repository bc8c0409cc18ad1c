"""Sampling speed: our jitted reverse loop against diffusers' DDPMPipeline / DDIMPipeline on the same weights.

    python bench/bench_sampling.py                          # the digits demo's UNet (random weights), 16 images
    python bench/bench_sampling.py --pipeline ddpm-digits-8   # an exported pipeline folder
    python bench/bench_sampling.py --quick                  # 100 DDPM / 10 DDIM steps, 4 images
    taskset -c 0 python bench/bench_sampling.py --clock cpu  # one pinned core, CPU seconds (a shared machine)

Both sides run the same UNet weights (ours exported with `save_pipeline`, then `DDPMPipeline.from_pretrained`)
and the same number of steps and images. Printed: each side's median time over `--runs` timed runs, the sides
taking turns (ours excludes compiling, which is printed apart), and the ratio. `--clock cpu` counts this process's
CPU seconds (all threads) instead of wall seconds: on a busy machine, pin both sides to one core with taskset and
compare CPU time. The target is ours >= 2x faster. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _pipeline_folder(args: argparse.Namespace, tmp: str) -> str:
    """The folder both sides load: --pipeline, or the config's UNet with fresh weights exported into `tmp`."""
    if args.pipeline:
        return args.pipeline
    import importlib.util

    from uncond_flax.config import noise_scheduler_for, resolve_config
    from uncond_flax.export import save_pipeline
    from uncond_flax.train_state import build_model

    spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, args.config))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = resolve_config(module.get_config())
    save_pipeline(tmp, build_model(config), noise_scheduler_for(config))
    return tmp


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def ours(folder: str, scheduler_name: str, num_images: int, steps: int, seed: int) -> Callable[[], object]:
    """One call of `uncond_flax.sampling.sample_images` on the folder's UNet (the first call compiles)."""
    import jax

    from uncond_flax.export import load_unet
    from uncond_flax.sampling import sample_images
    from uncond_flax.schedulers import FlaxDDIMScheduler, FlaxDDPMScheduler

    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        scheduler_config = json.load(f)
    if scheduler_name == "ddim":
        scheduler_config.pop("variance_type", None)  # a DDPM-only key
        scheduler = FlaxDDIMScheduler.from_config(scheduler_config)
    else:
        scheduler = FlaxDDPMScheduler.from_config(scheduler_config)
    model = load_unet(folder)
    return lambda: sample_images(
        model, scheduler, batch_size=num_images, num_inference_steps=steps, key=jax.random.key(seed)
    )


def theirs(folder: str, scheduler_name: str, num_images: int, steps: int, seed: int) -> Callable[[], object]:
    """One call of diffusers' own pipeline (no_grad, fp32, the default torch threads) drawing `num_images`."""
    import torch
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    pipe = DDPMPipeline.from_pretrained(folder)
    if scheduler_name == "ddim":
        pipe = DDIMPipeline(unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    if torch.cuda.is_available():
        pipe = pipe.to("cuda")
    return lambda: pipe(
        batch_size=num_images, num_inference_steps=steps, generator=torch.manual_seed(seed), output_type="np"
    )


def time_both(
    folder: str, scheduler_name: str, num_images: int, steps: int, seed: int, clock: Callable[[], float], runs: int
) -> tuple[float, float, float]:
    """(our compile seconds, our median seconds, diffusers' median seconds) over `runs` timed calls each, the two
    sides taking turns call by call after one untimed call each: ours compiles in it (its time less a timed call's
    is printed as compile time); diffusers' is there so both sides are timed alike (on the 2-vCPU EPYC its first
    DDPM-1000 call was no slower than the next three)."""
    sides = {
        "ours": ours(folder, scheduler_name, num_images, steps, seed),
        "theirs": theirs(folder, scheduler_name, num_images, steps, seed),
    }
    first = {}
    for name, call in sides.items():
        start = clock()
        call()
        first[name] = clock() - start
    times = {name: [] for name in sides}
    for _ in range(runs):
        for name, call in sides.items():
            start = clock()
            call()
            times[name].append(clock() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    return max(first["ours"] - median["ours"], 0.0), median["ours"], median["theirs"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", help="a diffusers DDPMPipeline folder (default: --config's UNet, random)")
    parser.add_argument("--config", default="configs/digits.py", help="config file whose UNet to build")
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--ddpm-steps", type=int, default=1000)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="100 DDPM / 10 DDIM steps, 4 images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side after an untimed one (median)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall seconds, or this process's CPU")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images, args.ddpm_steps, args.ddim_steps = 4, 100, 10
    if args.runs < 1:
        parser.error("--runs must be >= 1")

    import jax

    with tempfile.TemporaryDirectory() as tmp:
        folder = _pipeline_folder(args, tmp)
        with open(os.path.join(folder, "unet", "config.json")) as f:
            unet = json.load(f)
        print(
            f"device: {jax.device_count()} x {jax.devices()[0].device_kind}; UNet block_out_channels "
            f"{unet['block_out_channels']} at {unet['sample_size']} px; {args.num_images} images; {args.clock} seconds",
            flush=True,
        )
        for name, steps in (("ddpm", args.ddpm_steps), ("ddim", args.ddim_steps)):
            compile_s, ours_s, theirs_s = time_both(
                folder, name, args.num_images, steps, args.seed, CLOCKS[args.clock], args.runs
            )
            print(
                f"{name.upper()}-{steps}: ours {ours_s:8.2f} s (+ compile {compile_s:.1f} s)   "
                f"diffusers {theirs_s:8.2f} s   ours is {theirs_s / ours_s:.2f}x faster "
                f"(medians of {args.runs} runs)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
