"""The host's time per train-step call: the state passed as a TrainState (flax Variables) or as its list of leaves.

    python bench/bench_dispatch.py                      # the default UNet's state, then the digits demo's real step
    taskset -c 0 python bench/bench_dispatch.py --calls 100
    python bench/bench_dispatch.py --step-model default --batch 64 --precision bf16 --calls 20   # on a GPU

Every call of a jitted function flattens its arguments and builds its results. The TrainState keeps each array in a
flax Variable, flattened and rebuilt in Python, so the call costs host time in proportion to the leaves (1,356 for
the default UNet with AdamW) whatever the step computes. On an H100 the default step at batch 64 waits for its host
(README, Benchmarks), so the trainer's step takes and returns the leaves (`uncond_flax.step.jit_train_step`).

1. A jitted identity on the `--model` config's state (real shapes, zeros, one device, donated): the call alone.
2. The `--step-model` config's real train step both ways (`make_train_step` jitted on the TrainState, as before;
   `jit_train_step`, as the trainer runs it): blocks of calls alternate between the two. Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


# Per-device batch of each model's step when --batch is not given: the digits demo's, the small and default
# UNets' CPU benchmark sizes (on an H100 the default's is 64: --batch 64 --precision bf16).
BATCHES = {"digits": 64, "small": 16, "default": 4}


def _config(model: str, batch: int | None = None, precision: str = "no"):
    from bench_train_step import MODELS
    from bench_train_step import _config as bench_config

    from uncond_flax.config import resolve_config

    config = bench_config(model, batch or BATCHES[model], MODELS[model]["resolution"])
    config.mixed_precision = precision
    # gpu_check's schedule: with the same model, batch and precision the leaves form is the program gpu_check's
    # jax-step compiled, and a shared JAX compilation cache serves it (a GPU compile takes a minute).
    config.lr_scheduler = "constant_with_warmup"
    config.lr_warmup_steps = 10
    return resolve_config(config)


def _per_call_ms(call, calls: int, rounds: int) -> list[float]:
    """`rounds` timings of `calls` back-to-back calls (waiting once at the end of each), in ms per call."""
    import jax

    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls * 1e3)
    return times


def identity_calls(model: str, calls: int, rounds: int) -> dict[str, list[float]]:
    import jax
    import jax.numpy as jnp

    from uncond_flax.optim import make_optimizer
    from uncond_flax.parallel import make_mesh
    from uncond_flax.train_state import train_state_layout

    config = _config(model)
    device = jax.devices()[0]
    _, _, abstract, _, _ = train_state_layout(config, make_mesh(devices=[device]), make_optimizer(config, 10))
    state = jax.tree.map(lambda x: jax.device_put(jnp.zeros(x.shape, x.dtype), device), abstract)
    print(f"{model} UNet's state: {len(jax.tree.leaves(state))} leaves", flush=True)
    copy = jax.tree.map(lambda x: x.copy(), state)  # each form donates its own arrays
    holders = {"TrainState": [state], "leaves": [jax.tree.leaves(copy)]}
    identity = jax.jit(lambda s: s, donate_argnums=0)

    def call(form):
        holders[form][0] = identity(holders[form][0])
        return holders[form][0]

    for form in holders:
        jax.block_until_ready(call(form))
    times: dict[str, list[float]] = {form: [] for form in holders}
    for _ in range(rounds):  # alternated, so a busy machine slows both alike
        for form in holders:
            times[form] += _per_call_ms(lambda form=form: call(form), calls, 1)
    return times


def step_calls(
    model: str, calls: int, rounds: int, batch: int | None = None, precision: str = "no"
) -> dict[str, list[float]]:
    import jax
    import numpy as np

    from gpu_check import train_step_fn

    from uncond_flax.optim import make_optimizer
    from uncond_flax.parallel import make_mesh, replicated
    from uncond_flax.step import jit_train_step, step_compiler_options, step_seed
    from uncond_flax.train_state import create_train_state

    config = _config(model, batch, precision)
    mesh = make_mesh(devices=jax.devices()[:1])
    tx = make_optimizer(config, 10_000)
    graphdef, _, state, shardings = create_train_state(config, mesh, tx)
    step_fn = train_step_fn(config, graphdef, tx)
    on_leaves, images_sharding = jit_train_step(step_fn, shardings, mesh)
    on_state = jax.jit(
        step_fn,
        in_shardings=(shardings, images_sharding, replicated(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
        compiler_options=step_compiler_options(),
    )
    shape = (1, config.train_batch_size, config.resolution, config.resolution, config.model.in_channels)
    images = jax.device_put(np.random.default_rng(0).integers(0, 256, shape, np.uint8), images_sharding)
    copy = jax.tree.map(lambda x: x.copy(), state)
    seed = step_seed(config.seed, mesh)
    holders = {"TrainState": [state, on_state], "leaves": [jax.tree.leaves(copy), on_leaves]}
    print(f"{model} UNet's step, batch {config.train_batch_size}: {len(jax.tree.leaves(state))} leaves", flush=True)

    def call(form):
        holder = holders[form]
        holder[0], metrics = holder[1](holder[0], images, seed)
        return metrics

    for form in holders:  # compile, then one more call to settle
        start = time.perf_counter()
        jax.block_until_ready(call(form))
        jax.block_until_ready(call(form))
        print(f"  {form:<10}: compiled and ran twice in {time.perf_counter() - start:.1f} s", flush=True)
    times: dict[str, list[float]] = {form: [] for form in holders}
    for _ in range(rounds):
        for form in holders:
            times[form] += _per_call_ms(lambda form=form: call(form), calls, 1)
    return times


def _print(title: str, times: dict[str, list[float]]) -> None:
    base = statistics.median(times["TrainState"])
    print(title)
    for form, values in times.items():
        median = statistics.median(values)
        print(
            f"  {form:<10}: {median:8.2f} ms per call (min {min(values):.2f} max {max(values):.2f})"
            f"  {median / base:.2f}x the TrainState's",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", choices=["default", "small", "digits"])
    parser.add_argument("--step-model", default="digits", choices=["digits", "small", "default", "none"])
    parser.add_argument("--batch", type=int, default=None, help=f"the step's batch (default: {BATCHES})")
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"], help="the step's")
    parser.add_argument("--calls", type=int, default=50, help="calls per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="timed blocks per form (median reported)")
    args = parser.parse_args()
    import jax

    print(f"jax {jax.__version__} on {jax.default_backend()}", flush=True)
    _print(
        f"a jitted identity on the {args.model} UNet's train state, donated:",
        identity_calls(args.model, args.calls, args.rounds),
    )
    if args.step_model != "none":
        times = step_calls(args.step_model, args.calls, args.rounds, args.batch, args.precision)
        _print(f"the {args.step_model} UNet's train step (the state donated):", times)


if __name__ == "__main__":
    main()
