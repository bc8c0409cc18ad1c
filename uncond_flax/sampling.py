"""The reverse diffusion process as one jitted `lax.scan`, with the batch sharded over every device."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from uncond_flax.parallel import batch_sharding, make_mesh, num_batch_shards, replicated, to_host
from uncond_flax.schedulers import FlaxDDIMScheduler
from uncond_flax.step import step_compiler_options


def _pad_batch(x: jax.Array, batch: int, axis: int = 0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, batch - x.shape[axis])
    return jnp.pad(x, pad)


def reverse_process(
    model: nnx.Module,
    scheduler: Any,
    noise_BHWC: jax.Array,
    step_noise_fn: Callable[[jax.Array], jax.Array],
    eta: float = 0.0,
) -> jax.Array:
    """Denoise `noise_BHWC` over `scheduler.timesteps` (set_timesteps already called); float32, about [-1, 1].

    `step_noise_fn(i)` gives the noise for step i; the scheduler uses it only where it adds noise.
    """

    def body(x_BHWC, inputs):
        i, t = inputs
        model_output = model(x_BHWC, t).astype(jnp.float32)
        kwargs = {"eta": eta} if isinstance(scheduler, FlaxDDIMScheduler) else {}
        out = scheduler.step(model_output, t, x_BHWC, variance_noise=step_noise_fn(i), **kwargs)
        return out.prev_sample.astype(jnp.float32), None

    steps = scheduler.timesteps.shape[0]
    x, _ = jax.lax.scan(body, noise_BHWC.astype(jnp.float32), (jnp.arange(steps), scheduler.timesteps))
    return x


def sample_images(
    model: nnx.Module,
    scheduler: Any,
    *,
    batch_size: int,
    num_inference_steps: int,
    key: jax.Array | None = None,
    image_shape: tuple[int, int, int] | None = None,
    mesh: Mesh | None = None,
    eta: float = 0.0,
    noise_BHWC: Any = None,
    step_noise_TBHWC: Any = None,
) -> np.ndarray:
    """Generate `batch_size` images in [0, 1] (NHWC float32 numpy on every process), as DDPMPipeline does.

    Noise comes from `key` (drawn inside the jitted program), or exactly from `noise_BHWC` (initial) and
    `step_noise_TBHWC` (one per step). The batch is padded to a multiple of the device count and sharded over
    all devices; the images do not depend on how many devices there are.
    """
    if image_shape is None:
        size = model.config["sample_size"]
        if size is None:
            raise ValueError("image_shape is required: the model's sample_size is None")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        image_shape = (h, w, model.config["in_channels"])
    scheduler = scheduler.set_timesteps(num_inference_steps)
    steps = int(scheduler.timesteps.shape[0])
    shape_BHWC = (batch_size, *image_shape)
    explicit = noise_BHWC is not None or step_noise_TBHWC is not None
    if explicit and (noise_BHWC is None or step_noise_TBHWC is None):
        raise ValueError("pass both noise_BHWC and step_noise_TBHWC, or neither (and a key)")
    if not explicit and key is None:
        raise ValueError("pass key=jax.random.key(seed), or both noise_BHWC and step_noise_TBHWC")

    mesh = make_mesh() if mesh is None else mesh
    padded = -(-batch_size // num_batch_shards(mesh)) * num_batch_shards(mesh)
    if explicit:
        noise_BHWC = np.asarray(noise_BHWC, np.float32)
        step_noise_TBHWC = np.asarray(step_noise_TBHWC, np.float32)
        if noise_BHWC.shape != shape_BHWC or step_noise_TBHWC.shape != (steps, *shape_BHWC):
            raise ValueError(
                f"noise shapes {noise_BHWC.shape} / {step_noise_TBHWC.shape} do not match "
                f"{shape_BHWC} / {(steps, *shape_BHWC)}"
            )
        noise = (
            np.pad(noise_BHWC, [(0, padded - batch_size)] + [(0, 0)] * 3),
            np.pad(step_noise_TBHWC, [(0, 0), (0, padded - batch_size)] + [(0, 0)] * 3),
        )
    else:
        typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        noise = np.asarray(jax.random.key_data(key) if typed else key)

    graphdef, state = nnx.split(model)
    # Host copies, placed replicated on the mesh: valid inputs on one process or many.
    scheduler = jax.device_put(jax.tree.map(np.asarray, scheduler), replicated(mesh))
    run = _compiled_sampler(graphdef, mesh, eta, shape_BHWC, padded, explicit)
    return to_host(run(state, scheduler, noise))[:batch_size]


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def sampler_compiler_options() -> dict[str, str] | None:
    """XLA options for the sampler: on a CPU with several cores, the train step's (XLA's own convolutions); else
    XLA's defaults (YNNPACK's convolutions).

    YNNPACK splits each of the sampler's small convolutions over all threads, and the chain of small ops then hops
    between them: the digits UNet's DDPM-1000 took 3.17 s with YNNPACK's convolutions on two cores, 2.56 s with
    XLA's; on one pinned core YNNPACK's are the faster, 2.85 against 3.28 s (bench/bench_sampling.py, README).
    """
    if jax.default_backend() != "cpu" or _usable_cpus() < 2:
        return None
    return step_compiler_options()


@functools.lru_cache(maxsize=16)  # a preview and an evaluation sampler per run; bounded for long-lived processes
def _compiled_sampler(graphdef, mesh: Mesh, eta: float, shape_BHWC: tuple, padded: int, explicit: bool):
    """One jitted sampler per (model structure, mesh, eta, shape, noise mode); scheduler arrays are traced."""
    batch = batch_sharding(mesh)

    def pad(x_BHWC):
        return jax.lax.with_sharding_constraint(_pad_batch(x_BHWC, padded), batch)

    def run(state, scheduler, noise):
        model = nnx.merge(graphdef, state)
        if explicit:
            x_T, step_noise_TBHWC = noise
            step_noise_fn = lambda i: step_noise_TBHWC[i]  # noqa: E731
        else:
            # Draw for the real rows only, then pad: padding never changes the real rows' noise.
            init_key, steps_key = jax.random.split(jax.random.wrap_key_data(noise))
            x_T = pad(jax.random.normal(init_key, shape_BHWC, jnp.float32))
            step_noise_fn = lambda i: pad(jax.random.normal(jax.random.fold_in(steps_key, i), shape_BHWC))  # noqa
        x = reverse_process(model, scheduler, x_T, step_noise_fn, eta)
        return jnp.clip(x / 2 + 0.5, 0.0, 1.0)

    noise_shardings = (batch, NamedSharding(mesh, P(None, *batch.spec))) if explicit else replicated(mesh)
    return jax.jit(
        run,
        in_shardings=(None, replicated(mesh), noise_shardings),
        out_shardings=batch,
        compiler_options=sampler_compiler_options(),
    )
