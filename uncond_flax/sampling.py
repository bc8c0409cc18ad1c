"""The reverse diffusion process as one jitted `lax.scan`, with the batch sharded over every device."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from uncond_flax.parallel import batch_sharding, make_mesh, num_batch_shards, replicated


def _pad_batch(x: jax.Array, batch: int, axis: int = 0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, batch - x.shape[axis])
    return jnp.pad(x, pad)


def _is_ddim(scheduler: Any) -> bool:
    return type(scheduler).__name__ == "FlaxDDIMScheduler"


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
        kwargs = {"eta": eta} if _is_ddim(scheduler) else {}
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
    """Generate `batch_size` images in [0, 1] (NHWC float32 numpy), as diffusers' DDPMPipeline does.

    Noise comes from `key`, or exactly from `noise_BHWC` (initial) and `step_noise_TBHWC` (one per step).
    The batch is padded to a multiple of the device count and sharded over all devices; the images do not
    depend on how many devices there are.
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
    if key is None and (noise_BHWC is None or step_noise_TBHWC is None):
        raise ValueError("pass key=jax.random.key(seed), or both noise_BHWC and step_noise_TBHWC")
    if key is not None:
        init_key, key = jax.random.split(key)
        if noise_BHWC is None:
            noise_BHWC = jax.random.normal(init_key, shape_BHWC, jnp.float32)
    noise_BHWC = jnp.asarray(noise_BHWC, jnp.float32)
    if noise_BHWC.shape != shape_BHWC:
        raise ValueError(f"noise_BHWC has shape {noise_BHWC.shape}, expected {shape_BHWC}")

    mesh = make_mesh() if mesh is None else mesh
    padded = -(-batch_size // num_batch_shards(mesh)) * num_batch_shards(mesh)
    noise_BHWC = _pad_batch(noise_BHWC, padded)
    if step_noise_TBHWC is not None:
        step_noise_TBHWC = jnp.asarray(step_noise_TBHWC, jnp.float32)
        if step_noise_TBHWC.shape != (steps, *shape_BHWC):
            raise ValueError(f"step_noise_TBHWC has shape {step_noise_TBHWC.shape}, expected {(steps, *shape_BHWC)}")
        step_noise_TBHWC = _pad_batch(step_noise_TBHWC, padded, axis=1)
        key = None

    graphdef, state = nnx.split(model)
    run = _compiled_sampler(graphdef, mesh, eta, batch_size, explicit_noise=key is None)
    images = run(state, scheduler, noise_BHWC, step_noise_TBHWC if key is None else key)
    return np.asarray(jax.device_get(images))[:batch_size]


_SAMPLERS: dict = {}


def _compiled_sampler(graphdef, mesh: Mesh, eta: float, batch_size: int, explicit_noise: bool):
    """One jitted sampler per (model structure, mesh, eta, batch, noise mode); scheduler arrays are traced."""
    cache_key = (graphdef, mesh, eta, batch_size, explicit_noise)
    if cache_key in _SAMPLERS:
        return _SAMPLERS[cache_key]
    batch = batch_sharding(mesh)

    def run(state, scheduler, noise_BHWC, noise_source):
        model = nnx.merge(graphdef, state)
        if explicit_noise:
            step_noise_fn = lambda i: noise_source[i]  # noqa: E731
        else:
            # Draw for the real rows only, then pad: padding never changes the real rows' noise.
            def step_noise_fn(i):
                real = jax.random.normal(jax.random.fold_in(noise_source, i), (batch_size, *noise_BHWC.shape[1:]))
                return jax.lax.with_sharding_constraint(_pad_batch(real, noise_BHWC.shape[0]), batch)

        x = reverse_process(model, scheduler, noise_BHWC, step_noise_fn, eta)
        return jnp.clip(x / 2 + 0.5, 0.0, 1.0)

    noise_sharding = NamedSharding(mesh, P(None, *batch.spec)) if explicit_noise else replicated(mesh)
    _SAMPLERS[cache_key] = jax.jit(
        run, in_shardings=(replicated(mesh), replicated(mesh), batch, noise_sharding), out_shardings=batch
    )
    return _SAMPLERS[cache_key]
