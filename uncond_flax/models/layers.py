"""Conv, Linear, GroupNorm and activations initialised like their torch.nn counterparts.

Matching torch's default init (kaiming-uniform weights with a=sqrt(5), uniform biases, unit GroupNorm
affine) means training from scratch starts from the same distribution as diffusers' trainer.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from uncond_flax.errors import check_choice


class _Pending(threading.local):
    draws: list | None = None  # (signature, initializer, key, shape, dtype, placeholder), inside `batched_draws`


_pending = _Pending()


class BatchedDraws:
    """The random weights drawn inside `batched_draws()`, made together by `fill`."""

    def __init__(self, draws: list):
        self._draws = draws

    def _groups(self) -> dict[tuple, list]:
        groups: dict[tuple, list] = {}
        for signature, init, key, shape, dtype, placeholder in self._draws:
            groups.setdefault((signature, shape, dtype), []).append((init, key, placeholder))
        return groups

    def key_data(self) -> list[jax.Array]:
        """The draws' keys as raw data (uint32), stacked per (initializer, shape, dtype) in `fill`'s order, computed
        now: `fill(tree, key_data)` of the same model built again draws from these (a program's arguments) instead
        of from its own keys (constants of the program)."""
        with jax.ensure_compile_time_eval():
            return [jnp.stack([jax.random.key_data(key) for _, key, _ in group]) for group in self._groups().values()]

    def fill(self, tree: Any, key_data: list[jax.Array] | None = None) -> Any:
        """`tree` (the built model's weights) with each placeholder replaced by its draw. Draws of one initializer,
        shape and dtype are made by one vmapped call, whose rows are exactly what the single calls give (the same
        threefry counters under each key). `key_data`: `key_data()` of a build of the same model, drawn from
        instead of this build's keys."""
        groups = self._groups()
        if key_data is not None and [len(g) for g in groups.values()] != [len(k) for k in key_data]:
            raise ValueError("batched_draws: key_data is of another model's draws")
        drawn = {}
        for g, ((_, shape, dtype), members) in enumerate(groups.items()):
            init = members[0][0]
            if key_data is None:
                keys = jnp.stack([key for _, key, _ in members])
            else:
                keys = jax.random.wrap_key_data(key_data[g])
            values = jax.vmap(lambda key, init=init, shape=shape, dtype=dtype: init(key, shape, dtype))(keys)
            drawn.update((id(placeholder), values[i]) for i, (_, _, placeholder) in enumerate(members))
        leaves, treedef = jax.tree.flatten(tree)
        filled = [drawn.pop(id(leaf), leaf) for leaf in leaves]
        if drawn:  # a placeholder that is not a weight of `tree` would leave zeros where weights belong
            raise RuntimeError(f"batched_draws: {len(drawn)} draws are not leaves of the tree given to fill()")
        return jax.tree.unflatten(treedef, filled)


@contextlib.contextmanager
def batched_draws() -> Iterator[BatchedDraws]:
    """Layers built inside draw no random weights: each of their initializers returns a placeholder (zeros) and
    notes its key; `.fill(weights)` then makes the draws, one vmapped call per initializer, shape and dtype. The
    weights are the same, bit for bit. The default UNet's init program then holds 53 draws instead of 308. On one
    core XLA:CPU compiles it in 16-21 s instead of 32-37 and runs it in 2.7 s instead of 2.1, and a fresh state
    takes 22-24 s instead of 29-35 (the digits UNet: no difference measurable)."""
    if _pending.draws is not None:
        raise RuntimeError("batched_draws() does not nest")
    draws: list = []
    _pending.draws = draws
    try:
        yield BatchedDraws(draws)
    finally:
        _pending.draws = None


def _batchable(init: Callable, signature: tuple) -> Callable:
    """`init(key, shape, dtype)`; inside `batched_draws()`, a placeholder whose draw `fill` makes, together with the
    other draws of the same `signature` (equal signatures: the same initializer for equal shapes), shape and dtype."""

    def draw(key, shape, dtype=jnp.float32):
        if _pending.draws is None:
            return init(key, shape, dtype)
        placeholder = jnp.zeros(shape, dtype)
        _pending.draws.append((signature, init, key, tuple(shape), jnp.dtype(dtype), placeholder))
        return placeholder

    return draw


# Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's kaiming_uniform_(a=sqrt(5)) for weights (fan_in from the shape).
_torch_kernel_init = _batchable(nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"), ("kernel",))


def _torch_bias_init(fan_in: int) -> Callable:
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return _batchable(init, ("bias", fan_in))


def conv_as_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    **kwargs,
) -> jax.Array:
    """`lax.conv_general_dilated` for NHWC x HWIO as one matmul over the stacked k*k shifted inputs (im2col).

    All three directions become plain GEMMs (the weight gradient is `patches^T @ grad`), at the cost of k*k
    copies of the input; kept as a measured alternative (bench/bench_layers.py). Other layouts, dilations and
    groups fall back to the convolution itself.
    """
    dilated = any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    if isinstance(padding, str) or dilated or feature_group_count != 1 or lhs.ndim != 4:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
            precision, preferred_element_type, **kwargs,
        )  # fmt: skip
    kh, kw, c, o = rhs.shape
    sh, sw = window_strides
    (pt, pb), (pl, pr) = padding
    x_BHWC = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho, wo = (x_BHWC.shape[1] - kh) // sh + 1, (x_BHWC.shape[2] - kw) // sw + 1
    # Tap (i, j) sees x[i + sh*y, j + sw*x]; stacked (i, j, c)-major to match the HWIO kernel's flattening.
    taps = [
        x_BHWC[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
    return jnp.matmul(
        patches, rhs.reshape(kh * kw * c, o), precision=precision, preferred_element_type=preferred_element_type
    )


# On CPU a convolution producing at most this many output rows (batch x height x width, the global shape as traced)
# runs as a matmul: see `conv_auto`.
CONV_MATMUL_MAX_ROWS = 128


def conv_auto(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding, *args, **kwargs) -> jax.Array:
    """The convolution op, but on CPU the matmul form (`conv_as_matmul`) where the output is smaller than the kernel
    or has at most `CONV_MATMUL_MAX_ROWS` rows.

    Below the kernel, XLA:CPU swaps the roles of image and kernel in the backward convolutions, and the swapped form
    runs at ~0.5 GFLOP/s: a 3x3 convolution at 2 px x 512 channels, forward + backward, took 170 ms as the op and
    3.6 ms as a matmul (batch 4; a stride-2 one from 4 px: 99 vs 6.7 ms). The default UNet has 2 px blocks.
    With few rows, the op's backward pass spends much of its time flipping the kernel and swapping its in and out
    channels, a copy XLA:CPU makes at ~1-2 GB/s; the matmul form's dots read the kernel as it lies. Forward +
    backward at 4 px x 512 channels: batch 4 (64 rows) 10.6 ms as the op, 5.9 ms as a matmul; batch 8 (128 rows)
    18.2 vs 15.0 ms. At 256 rows neither wins everywhere, and above it the op is faster (bench/bench_layers.py,
    batches 4, 8 and 16). The default UNet's step at batch 4: 4.74 -> 4.34 s. NHWC x HWIO, like
    `conv_as_matmul`.
    """
    if jax.default_backend() == "cpu" and lhs.ndim == 4 and not isinstance(padding, str):
        kernel = rhs.shape[:2]
        out = [(lhs.shape[1 + i] + sum(padding[i]) - kernel[i]) // window_strides[i] + 1 for i in range(2)]
        if min(out) < max(kernel) or lhs.shape[0] * out[0] * out[1] <= CONV_MATMUL_MAX_ROWS:
            return conv_as_matmul(lhs, rhs, window_strides, padding, *args, **kwargs)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs)


# How Conv layers compute; equal results, other speed. "auto" is `conv_auto`: the convolution op on every backend
# (GPU/TPU compilers own their convolutions), but the matmul form for CPU convolutions whose output is smaller
# than their kernel or has few rows.
CONV_IMPLS: dict[str, Callable[..., jax.Array]] = {
    "auto": conv_auto,
    "conv": lax.conv_general_dilated,
    "matmul": conv_as_matmul,
}


def _dense_dims(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> bool:
    """Whether `dimension_numbers` are nnx.Linear's: the last axis of `lhs` against a 2-D kernel's first."""
    return (
        rhs.ndim == 2
        and tuple(map(tuple, dimension_numbers[0])) == ((lhs.ndim - 1,), (0,))
        and not any(dimension_numbers[1])
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense_canonical_grad(x: jax.Array, kernel: jax.Array, precision, preferred_element_type) -> jax.Array:
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision, preferred_element_type)


def _dense_canonical_grad_fwd(x, kernel, precision, preferred_element_type):
    return _dense_canonical_grad(x, kernel, precision, preferred_element_type), (x, kernel)


def _dense_canonical_grad_bwd(precision, preferred_element_type, residuals, dy):
    x, kernel = residuals
    x_NC, dy_NO = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dx = lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())), precision, preferred_element_type)
    # (C, N) @ (N, O), both operands laid out as written: the barriers keep XLA from folding the transposes into
    # the product's operand layouts (see `dense_dot`).
    xT_CN, dy_NO = lax.optimization_barrier((x_NC.T, dy_NO))
    dkernel = lax.dot_general(xT_CN, dy_NO, (((1,), (0,)), ((), ())), precision, preferred_element_type)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_dense_canonical_grad.defvjp(_dense_canonical_grad_fwd, _dense_canonical_grad_bwd)


def dense_dot(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    """nnx.Linear's product, `lax.dot_general`, but on CPU with the kernel's gradient computed as a plain
    (C, N) @ (N, O) product of copies laid out as written.

    Left to autodiff, the kernel's gradient contracts the N = batch x tokens rows of both operands, and XLA:CPU
    takes the output gradient transposed where it comes from the attention's heads: that product runs outside
    YNNPACK at ~40 GFLOP/s (the small UNet's 16 attention projections, (4096, 64) by (4096, 64) rows: 0.8-1.0 ms
    each, 11 ms of the step's 19 ms of dots); the plain product and its copy run at 150-190 GFLOP/s. The small
    UNet's step went from 0.225 to 0.215 s, the digits UNet's from 0.053 to 0.050 s (bench/bench_train_step.py
    --jax "" --jax "linear=dot", one core). The values are the same products, summed in another order.
    """
    if jax.default_backend() == "cpu" and not kw.get("out_sharding") and _dense_dims(lhs, rhs, dimension_numbers):
        return _dense_canonical_grad(lhs, rhs, precision, preferred_element_type)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kw)


# How Linear layers compute their product: "auto" = `dense_dot` (on CPU, the kernel's gradient as a plain product;
# elsewhere lax.dot_general), "dot" = lax.dot_general, its gradient left to autodiff.
LINEAR_IMPLS: dict[str, Callable[..., jax.Array]] = {"auto": dense_dot, "dot": lax.dot_general}
# How the attention block computes softmax(q k^T) v: "xla" = jax.nn.dot_product_attention over all heads at
# once; "per_head" = one head at a time (a loop), recomputed in the backward pass; "blockwise" = a few (image,
# head) pairs at a time with a hand-written backward pass (attention.attention_blockwise); "auto" = blockwise on
# CPU, xla elsewhere.
ATTENTION_IMPLS = ("auto", "xla", "per_head", "blockwise")
# How GroupNorm reduces: "grouped" = flax's nnx.GroupNorm (reshape to (..., G, C/G), reduce over a minor axis of
# C/G); "channel_sums" = sum each channel over space first, then the channels of a group (on CPU, where XLA runs
# the short minor-axis reductions slowly: norm + SiLU 6x faster than grouped at 16 channels in 8 groups, 1.2x at
# 224 in 32; the digits UNet samples 1.4x faster); "fused" = channel_sums' statistics with a hand-written backward
# pass that also takes the SiLU after the norm (`group_norm_act`): two passes over the activations where
# autodiff's backward makes several, and no copy of the norm's output kept for SiLU's gradient. "auto" = fused on
# CPU (the small UNet's step 0.111-0.113 s against 0.117-0.119 with channel_sums on two cores, 0.177 against 0.180
# on one), grouped elsewhere (fused not measured on a GPU). bench_train_step.py --jax norm=... compares them.
NORM_IMPLS = ("auto", "grouped", "channel_sums", "fused")
# How Upsample2D convolves the upsampled image: "nearest_conv" upsamples, then convolves (as diffusers); "phases"
# convolves the input itself with four 2x2 kernels (`resnet.upsample_conv_phases`: 16 instead of 36 multiply-adds
# per input pixel); "auto" = phases on CPU, nearest_conv elsewhere (not measured on a GPU).
UPSAMPLE_IMPLS = ("auto", "nearest_conv", "phases")
_impls = {"conv": "auto", "attention": "auto", "norm": "auto", "linear": "auto", "upsample": "auto"}
# The keyword arguments of `implementations`, one per kind of layer.
IMPLEMENTATION_KINDS = tuple(_impls)


@contextlib.contextmanager
def implementations(
    *,
    conv: str | None = None,
    attention: str | None = None,
    norm: str | None = None,
    linear: str | None = None,
    upsample: str | None = None,
) -> Iterator[None]:
    """Layers built inside compute convolutions / attention / group norms / linear layers / upsampling convolutions
    as named (CONV_IMPLS, ATTENTION_IMPLS, NORM_IMPLS, LINEAR_IMPLS, UPSAMPLE_IMPLS)."""
    chosen = {"conv": conv, "attention": attention, "norm": norm, "linear": linear, "upsample": upsample}
    kinds = (
        ("conv", CONV_IMPLS),
        ("attention", ATTENTION_IMPLS),
        ("norm", NORM_IMPLS),
        ("linear", LINEAR_IMPLS),
        ("upsample", UPSAMPLE_IMPLS),
    )
    for kind, choices in kinds:
        if chosen[kind] is not None:
            check_choice(kind, chosen[kind], tuple(choices), "implementations")
    previous = dict(_impls)
    _impls.update({k: v for k, v in chosen.items() if v is not None})
    try:
        yield
    finally:
        _impls.update(previous)


def current_implementation(kind: str) -> str:
    """The implementation layers built now use for `kind` ("conv", "attention", "norm", "linear" or "upsample")."""
    return _impls[kind]


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
    """torch.nn.Conv2d(in, out, k, stride, padding) for NHWC inputs (kernel HWIO), computed per `implementations`."""
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
        conv_general_dilated=CONV_IMPLS[_impls["conv"]],
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
        dot_general=LINEAR_IMPLS[_impls["linear"]],
        rngs=rngs,
    )


class GroupNorm(nnx.GroupNorm):
    """nnx.GroupNorm (same parameters, statistics in float32, two-pass variance) computed per `NORM_IMPLS`."""

    def __init__(self, *args, impl: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.impl = impl

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        activation: Callable[[jax.Array], jax.Array] | None = None,
    ) -> jax.Array:
        """`activation(norm(x))` (just the norm without `activation`); the "fused" implementation takes SiLU into
        its backward pass."""
        impl = self.impl
        if impl == "auto":
            impl = "fused" if jax.default_backend() == "cpu" else "grouped"
        if impl == "grouped" or mask is not None or self.reduction_axes is not None:
            y = super().__call__(x, mask=mask)
            return y if activation is None else activation(y)
        scale = self.scale[...] if self.scale else None
        bias = self.bias[...] if self.bias else None
        x, scale, bias = self.promote_dtype((x, scale, bias), dtype=self.dtype)
        if impl == "fused" and scale is not None and bias is not None and activation in (None, jax.nn.silu):
            return group_norm_act(x, scale, bias, self.num_groups, self.epsilon, activation is jax.nn.silu)
        y, _ = _group_norm_forward(x, scale, bias, self.num_groups, self.epsilon)
        y = y.astype(x.dtype)
        return y if activation is None else activation(y)


def _spatial(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(1, x.ndim - 1))


def _as_BsC(v_BC: jax.Array, x: jax.Array) -> jax.Array:
    """(B, C) -> (B, 1, ..., 1, C): to broadcast over `x`'s spatial axes."""
    return v_BC.reshape(v_BC.shape[0], *([1] * (x.ndim - 2)), v_BC.shape[1])


# How channel_sums and fused turn per-channel sums (B, C) into each channel's group mean (B, C): "reshape" sums
# (B, G, C/G) and repeats the result; "dot" multiplies by the (C, G) membership matrix and back (exact: one 1 per
# row). XLA:CPU fuses the repeat into every element-wise loop that broadcasts the means over the activations, and
# computes each element's group with an integer division there: GroupNorm + SiLU forward + backward at (16, 32,
# 32, 96) took 4.2-5.4 ms with "reshape", 2.3 with "dot" (the dots are separate ops, their results plain (B, C)
# vectors). "auto": dot on CPU, reshape elsewhere (not measured on a GPU). Read while tracing.
GROUP_MEANS = "auto"


def _group_mean(sums_BC: jax.Array, num_groups: int, count: int) -> jax.Array:
    """Per-channel sums (B, C) -> each channel's group mean (B, C), `count` elements per group."""
    b, c = sums_BC.shape
    by_dot = GROUP_MEANS == "dot" or (GROUP_MEANS == "auto" and jax.default_backend() == "cpu")
    if by_dot and c > num_groups:
        member_CG = jnp.asarray(np.repeat(np.eye(num_groups, dtype=sums_BC.dtype), c // num_groups, axis=0))
        exact = lax.Precision.HIGHEST  # no TF32 or bf16 passes for a float32 sum on any backend
        sums_BG = jnp.dot(sums_BC, member_CG, precision=exact)
        return jnp.dot(sums_BG / count, member_CG.T, precision=exact)
    sums_BG = sums_BC.reshape(b, num_groups, c // num_groups).sum(axis=-1)
    return jnp.repeat(sums_BG / count, c // num_groups, axis=1)


def _group_count(x: jax.Array, num_groups: int) -> int:
    """The elements of `x` in one (image, group): its spatial size times the channels per group."""
    return math.prod(x.shape[1:-1]) * (x.shape[-1] // num_groups)


def _group_norm_forward(x, scale, bias, num_groups: int, epsilon: float):
    """(float32 norm of x with scale and bias applied, (mean, rstd) per (B, C)): each channel summed over space
    first, then the channels of a group (XLA:CPU runs short minor-axis reductions slowly)."""
    spatial, count = _spatial(x), _group_count(x, num_groups)
    xf = x.astype(jnp.float32)
    mean_BC = _group_mean(xf.sum(axis=spatial), num_groups, count)
    centered = xf - _as_BsC(mean_BC, x)
    rstd_BC = lax.rsqrt(_group_mean((centered * centered).sum(axis=spatial), num_groups, count) + epsilon)
    mul_BC = rstd_BC if scale is None else rstd_BC * scale
    y = centered * _as_BsC(mul_BC, x)
    return (y if bias is None else y + bias), (mean_BC, rstd_BC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm_act(x, scale, bias, num_groups: int, epsilon: float, silu: bool) -> jax.Array:
    """GroupNorm over the last axis of `x` (channels) with `scale` and `bias`, then SiLU if `silu`; in x's dtype.
    The same function as channel_sums' norm (and `jax.nn.silu` after it), with a hand-written backward pass: one
    pass over x and the output's gradient for the per-channel sums, one for the input's gradient; only x and the
    statistics are kept for it."""
    return _group_norm_act_fwd(x, scale, bias, num_groups, epsilon, silu)[0]


def _group_norm_act_fwd(x, scale, bias, num_groups, epsilon, silu):
    y, (mean_BC, rstd_BC) = _group_norm_forward(x, scale, bias, num_groups, epsilon)
    out = jax.nn.silu(y) if silu else y
    return out.astype(x.dtype), (x, scale, bias, mean_BC, rstd_BC)


def _group_norm_act_bwd(num_groups, epsilon, silu, residuals, g):
    x, scale, bias, mean_BC, rstd_BC = residuals
    spatial, count = _spatial(x), _group_count(x, num_groups)
    xhat = (x.astype(jnp.float32) - _as_BsC(mean_BC, x)) * _as_BsC(rstd_BC, x)
    dy = g.astype(jnp.float32)  # the gradient at the norm's output (after scale and bias)
    if silu:
        y = xhat * scale + bias
        sig = jax.nn.sigmoid(y)
        dy = dy * sig * (1 + y * (1 - sig))
    sum_dy_BC = dy.sum(axis=spatial)
    sum_dy_xhat_BC = (dy * xhat).sum(axis=spatial)
    # d/dxhat = dy * scale; dx = rstd * (d/dxhat - its group mean - xhat * group mean of (d/dxhat * xhat)).
    mean_d_BC = _group_mean(sum_dy_BC * scale, num_groups, count)
    mean_d_xhat_BC = _group_mean(sum_dy_xhat_BC * scale, num_groups, count)
    dx = _as_BsC(rstd_BC, x) * (dy * scale - _as_BsC(mean_d_BC, x) - xhat * _as_BsC(mean_d_xhat_BC, x))
    dscale = sum_dy_xhat_BC.sum(axis=0).astype(scale.dtype)
    dbias = sum_dy_BC.sum(axis=0).astype(bias.dtype)
    return dx.astype(x.dtype), dscale, dbias


group_norm_act.defvjp(_group_norm_act_fwd, _group_norm_act_bwd)


def group_norm(
    num_channels: int, num_groups: int, eps: float, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
) -> GroupNorm:
    """torch.nn.GroupNorm over the last (channel) axis; statistics in float32, two-pass variance."""
    if num_groups is None or num_groups <= 0 or num_channels % num_groups:
        raise ValueError(f"GroupNorm: num_groups={num_groups} must be a positive divisor of channels={num_channels}")
    return GroupNorm(
        num_channels,
        num_groups=num_groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        impl=current_implementation("norm"),
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
    check_choice("act_fn", name, tuple(ACTIVATIONS))
    return ACTIVATIONS[name]
