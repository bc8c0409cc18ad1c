"""ResnetBlock2D, Downsample2D and Upsample2D (NHWC), numerically as in diffusers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uncond_flax.errors import check_choice
from uncond_flax.models.layers import conv2d, current_implementation, get_activation, group_norm, linear

# diffusers' resnet_time_scale_shift: the time embedding is added (default) or scales and shifts the norm.
TIME_EMBEDDING_NORMS = ("default", "scale_shift")


def avg_pool_2x(x_BHWC: jax.Array) -> jax.Array:
    """2x2 average pool, stride 2 (odd trailing rows/cols dropped, as torch's AvgPool2d)."""
    b, h, w, c = x_BHWC.shape
    x_BHWC = x_BHWC[:, : h // 2 * 2, : w // 2 * 2]
    return x_BHWC.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def nearest_upsample_2x(x_BHWC: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv; `padding == 0` pads one row/column at the bottom/right first (diffusers' quirk)."""

    def __init__(self, channels: int, padding: int = 1, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.padding = padding
        self.conv = conv2d(
            channels, channels, 3, stride=2, padding=padding, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        if self.padding == 0:
            x_BHWC = jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x_BHWC)


def upsample_conv_phases(conv: nnx.Conv, x_BHWC: jax.Array) -> jax.Array:
    """`conv(nearest_upsample_2x(x))` for a 3x3 `conv` with padding 1, as four 2x2 convolutions of x itself.

    Each output pixel (2i + a, 2j + b) sees the upsampled image's rows 2i + a - 1 .. 2i + a + 1, that is x's rows
    i - 1, i, i (a = 0) or i, i, i + 1 (a = 1), and likewise for columns: so each of the four output phases is a
    2x2 convolution of x whose taps are sums of the 3x3 kernel's (zero padding matches on both sides). 16 instead
    of 36 multiply-adds per input pixel and channel pair, forward and backward; equal up to float32 rounding (the
    summed taps)."""
    kernel = conv.kernel[...]
    bias = conv.bias[...] if conv.bias is not None else None
    x_BHWC, kernel, bias = conv.promote_dtype((x_BHWC, kernel, bias), dtype=conv.dtype)
    k0, k1, k2 = kernel[0], kernel[1], kernel[2]  # the kernel's rows, (3, in, out) each
    rows = ((k0, k1 + k2), (k0 + k1, k2))  # phase a = 0: x's rows i - 1, i; a = 1: rows i, i + 1
    pads = ((1, 0), (0, 1))
    phases = []
    for a in (0, 1):
        for b in (0, 1):
            cols = [(r[0], r[1] + r[2]) if b == 0 else (r[0] + r[1], r[2]) for r in rows[a]]
            kernel_22IO = jnp.stack([jnp.stack(c) for c in cols])
            phases.append(
                conv.conv_general_dilated(
                    x_BHWC,
                    kernel_22IO,
                    (1, 1),
                    (pads[a], pads[b]),
                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                    precision=conv.precision,
                )
            )
    bsz, h, w, _ = x_BHWC.shape
    out = jnp.stack(phases).reshape(2, 2, bsz, h, w, -1)  # (a, b, B, H, W, C) -> (B, H, a, W, b, C)
    out = jnp.transpose(out, (2, 3, 0, 4, 1, 5)).reshape(bsz, 2 * h, 2 * w, -1)
    return out if bias is None else out + bias


def upsampled_conv(conv: nnx.Conv, x_BHWC: jax.Array, impl: str) -> jax.Array:
    """`conv(nearest_upsample_2x(x))` computed as `impl` (layers.UPSAMPLE_IMPLS) says: "phases" (and "auto" on CPU)
    as `upsample_conv_phases`, else as written."""
    if impl == "phases" or (impl == "auto" and jax.default_backend() == "cpu"):
        return upsample_conv_phases(conv, x_BHWC)
    return conv(nearest_upsample_2x(x_BHWC))


class Upsample2D(nnx.Module):
    """Nearest 2x upsampling followed by a 3x3 conv, computed per `layers.UPSAMPLE_IMPLS`."""

    def __init__(self, channels: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = conv2d(channels, channels, 3, padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.impl = current_implementation("upsample")

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        return upsampled_conv(self.conv, x_BHWC, self.impl)


class ResnetBlock2D(nnx.Module):
    """GroupNorm-act-conv twice with the time embedding added (`default`) or as FiLM (`scale_shift`)."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = 512,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
        non_linearity: str = "swish",
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
        up: bool = False,
        down: bool = False,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        out_channels = in_channels if out_channels is None else out_channels
        check_choice("resnet_time_scale_shift", time_embedding_norm, TIME_EMBEDDING_NORMS)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.up = up
        self.down = down
        self.upsample_impl = current_implementation("upsample")  # for conv1 after `up` (layers.UPSAMPLE_IMPLS)
        self.nonlinearity = get_activation(non_linearity)

        self.norm1 = group_norm(in_channels, groups, eps, **kw)
        self.conv1 = conv2d(in_channels, out_channels, 3, padding=1, **kw)
        if temb_channels is not None:
            proj_out = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = linear(temb_channels, proj_out, **kw)
        else:
            self.time_emb_proj = None
        self.norm2 = group_norm(out_channels, groups, eps, **kw)
        self.dropout = nnx.Dropout(dropout)
        self.conv2 = conv2d(out_channels, out_channels, 3, padding=1, **kw)
        self.conv_shortcut = conv2d(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None

    def __call__(self, x_BHWC: jax.Array, temb_BD: jax.Array | None, rngs: nnx.Rngs | None = None) -> jax.Array:
        residual = x_BHWC
        h = self.norm1(x_BHWC, activation=self.nonlinearity)
        if self.up:
            residual, h = nearest_upsample_2x(residual), upsampled_conv(self.conv1, h, self.upsample_impl)
        else:
            if self.down:
                residual, h = avg_pool_2x(residual), avg_pool_2x(h)
            h = self.conv1(h)

        if self.time_emb_proj is not None:
            temb_BD = self.time_emb_proj(self.nonlinearity(temb_BD))[:, None, None, :]
        if self.time_embedding_norm == "default":
            if temb_BD is not None:
                h = h + temb_BD
            h = self.norm2(h, activation=self.nonlinearity)
        else:
            scale, shift = jnp.split(temb_BD, 2, axis=-1)
            h = self.nonlinearity(self.norm2(h) * (1 + scale) + shift)

        h = self.dropout(h, deterministic=rngs is None, rngs=rngs)
        h = self.conv2(h)
        if self.conv_shortcut is not None:
            residual = self.conv_shortcut(residual)
        return (residual + h) / self.output_scale_factor
