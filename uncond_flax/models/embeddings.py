"""Timestep embeddings: sinusoidal (Timesteps), Gaussian Fourier, and the TimestepEmbedding MLP."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from uncond_flax.models.layers import linear


class Buffer(nnx.Variable):
    """A weight that is saved and exported but never trained (torch `requires_grad=False`)."""


def timestep_embedding(
    timesteps_B: jax.Array,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: int = 10000,
) -> jax.Array:
    """Sinusoidal embedding of (B,) timesteps, float32, same layout and numerics as diffusers."""
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * jnp.arange(half_dim, dtype=jnp.float32)
    exponent = exponent / (half_dim - downscale_freq_shift)
    freqs = jnp.exp(exponent)
    args_BD = timesteps_B.astype(jnp.float32)[:, None] * freqs[None, :]
    args_BD = scale * args_BD
    emb = jnp.concatenate([jnp.sin(args_BD), jnp.cos(args_BD)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half_dim:], emb[:, :half_dim]], axis=-1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Timesteps(nnx.Module):
    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1.0):
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def __call__(self, timesteps_B: jax.Array) -> jax.Array:
        return timestep_embedding(
            timesteps_B, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift, self.scale
        )


class GaussianFourierProjection(nnx.Module):
    """Random Fourier features of log(t); the projection weight is frozen, as in diffusers."""

    def __init__(
        self,
        embedding_size: int = 256,
        scale: float = 1.0,
        log: bool = True,
        flip_sin_to_cos: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        self.weight = Buffer(jax.random.normal(rngs.params(), (embedding_size,), jnp.float32) * scale)
        self.log = log
        self.flip_sin_to_cos = flip_sin_to_cos

    def __call__(self, x_B: jax.Array) -> jax.Array:
        x_B = x_B.astype(jnp.float32)
        if self.log:
            x_B = jnp.log(x_B)
        proj = x_B[:, None] * self.weight[...][None, :] * 2 * jnp.pi
        if self.flip_sin_to_cos:
            return jnp.concatenate([jnp.cos(proj), jnp.sin(proj)], axis=-1)
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_channels: int, time_embed_dim: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = linear(in_channels, time_embed_dim, **kw)
        self.linear_2 = linear(time_embed_dim, time_embed_dim, **kw)

    def __call__(self, sample: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(sample)))
