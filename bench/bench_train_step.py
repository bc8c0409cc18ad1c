"""Train-step throughput beside the loader's, at the same resolution, in one run.

    python bench/bench_train_step.py                       # train_unconditional's UNet, 64 px, batch 8
    python bench/bench_train_step.py --batch-size 16 --mixed-precision bf16

Prints the images/s one jitted train step consumes (compile excluded) and the images/s our loader delivers
(0 and 2 workers, generated 500x375 JPEGs) so the loader/step ratio can be read off. Not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def bench_step(resolution: int, batch: int, mixed_precision: str, steps: int) -> tuple[float, float]:
    """(images/s, compile seconds) of the real train step on train_unconditional's default UNet."""
    import jax
    import jax.numpy as jnp

    from configs import default
    from uncond_flax.optim import lr_schedule_for, make_optimizer
    from uncond_flax.parallel import make_mesh
    from uncond_flax.step import make_train_step
    from uncond_flax.train import create_train_state, noise_scheduler_for, resolve_config

    config = default.get_config()
    config.dataset_name = "digits"
    config.resolution = resolution
    config.mixed_precision = mixed_precision
    config.train_batch_size = max(1, batch // jax.device_count())
    config = resolve_config(config)
    mesh = make_mesh()
    tx = make_optimizer(config, 10_000)
    graphdef, _, state, shardings = create_train_state(config, mesh, tx)
    step = jax.jit(
        make_train_step(
            graphdef,
            tx=tx,
            lr_fn=lr_schedule_for(config, 10_000),
            noise_scheduler=noise_scheduler_for(config),
            config=config,
        ),
        donate_argnums=0,
    )
    images = jnp.zeros((1, config.train_batch_size * jax.device_count(), resolution, resolution, 3), jnp.uint8)
    start = time.perf_counter()
    state, metrics = step(state, images)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, images)
    jax.block_until_ready(metrics)
    return steps * images.shape[1] / (time.perf_counter() - start), compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--num-images", type=int, default=300)
    args = parser.parse_args()

    import jax
    from bench_loader import bench_ours
    from fixtures.data_factory import make_jpeg_folder  # noqa: PLC0415

    step_rate, compile_s = bench_step(args.resolution, args.batch_size, args.mixed_precision, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_jpeg_folder(os.path.join(tmp, "images"), args.num_images)
        loader = {
            w: bench_ours(data_dir, os.path.join(tmp, "cache"), w, max(args.batch_size, 32), args.resolution, 8)
            for w in (0, 2)
        }
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    print(f"device: {device}; resolution {args.resolution}; train_unconditional UNet; {args.mixed_precision}")
    print(f"train step : {step_rate:8.1f} img/s (batch {args.batch_size}, compile {compile_s:.0f}s)")
    for workers, rate in loader.items():
        print(f"loader w={workers}: {rate:8.1f} img/s  ({rate / step_rate:.1f}x the step)")


if __name__ == "__main__":
    main()
