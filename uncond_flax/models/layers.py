"""Conv, Linear, GroupNorm and activations initialised like their torch.nn counterparts.

Matching torch's default init (kaiming-uniform weights with a=sqrt(5), uniform biases, unit GroupNorm
affine) means training from scratch starts from the same distribution as diffusers' trainer.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

# Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's kaiming_uniform_(a=sqrt(5)) for weights.
_torch_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int) -> Callable:
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int = 0,
    use_bias: bool = True,
    dtype=None,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """torch.nn.Conv2d(in, out, k, stride, padding) for NHWC inputs (kernel HWIO)."""
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_torch_kernel_init,
        bias_init=_torch_bias_init(in_channels * kernel_size * kernel_size),
        rngs=rngs,
    )


def linear(
    in_features: int, out_features: int, *, use_bias: bool = True, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
) -> nnx.Linear:
    """torch.nn.Linear(in, out); kernel is (in, out)."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_torch_kernel_init,
        bias_init=_torch_bias_init(in_features),
        rngs=rngs,
    )


def group_norm(
    num_channels: int, num_groups: int, eps: float, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
) -> nnx.GroupNorm:
    """torch.nn.GroupNorm over the last (channel) axis; statistics in float32, two-pass variance."""
    if num_groups is None or num_groups <= 0 or num_channels % num_groups:
        raise ValueError(f"GroupNorm: num_groups={num_groups} must be a positive divisor of channels={num_channels}")
    return nnx.GroupNorm(
        num_channels,
        num_groups=num_groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        rngs=rngs,
    )


def _mish(x: jax.Array) -> jax.Array:
    return x * jnp.tanh(jax.nn.softplus(x))


def _gelu_exact(x: jax.Array) -> jax.Array:
    # torch.nn.GELU() is the erf form, not the tanh approximation.
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
    "mish": _mish,
    "gelu": _gelu_exact,
    "relu": jax.nn.relu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"act_fn={name!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
