"""FLOPs counted from jaxprs against XLA's cost analysis and counts worked out by hand; the peak table; MFU."""

import types

import jax
import jax.numpy as jnp
import pytest

from uncond_flax.flops import mfu, peak_flops, step_flops


def _xla_flops(traced) -> float:
    """XLA's own count for a program of convolutions and matrix products (its CPU cost analysis, before fusion)."""
    return traced.lower().cost_analysis()["flops"]


def test_matmul_flops_are_2mnk():
    m, k, n = 64, 32, 16
    traced = jax.jit(lambda a, b: a @ b).trace(jnp.ones((m, k)), jnp.ones((k, n)))
    assert step_flops(traced) == 2 * m * n * k


def test_batched_dot_equals_xla():
    traced = jax.jit(lambda a, b: jnp.einsum("bij,bjk->bik", a, b)).trace(jnp.ones((3, 5, 7)), jnp.ones((3, 7, 2)))
    assert step_flops(traced) == 2 * 3 * 5 * 7 * 2 == _xla_flops(traced)


def test_same_padded_conv_counts_only_taps_inside_the_image():
    # 3x3 SAME conv on 8x8: along one axis the 2 edge outputs see 2 taps, the 6 others 3 -> 22 per axis.
    b, c_in, c_out = 2, 4, 5
    x, k = jnp.ones((b, 8, 8, c_in)), jnp.ones((3, 3, c_in, c_out))
    conv = jax.jit(
        lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    )
    assert step_flops(conv.trace(x, k)) == 2 * b * (22 * 22) * c_in * c_out


@pytest.mark.parametrize(
    "x_shape, k_shape, strides, padding, groups",
    [
        ((2, 8, 8, 4), (3, 3, 4, 5), (1, 1), "SAME", 1),
        ((2, 9, 9, 4), (3, 3, 4, 6), (2, 2), "SAME", 1),  # a downsampler: the gradients dilate
        ((2, 8, 8, 4), (4, 4, 4, 6), (2, 2), ((1, 2), (0, 1)), 1),
        ((2, 8, 8, 6), (3, 3, 2, 6), (1, 1), "SAME", 3),
        ((1, 7, 7, 4), (1, 1, 4, 8), (1, 1), "VALID", 1),
    ],
)
def test_convolution_and_its_gradients_equal_xla(x_shape, k_shape, strides, padding, groups):
    # The vjp's jaxpr also holds the forward convolution, whose result it drops: counted once, as XLA does.
    def conv(x, k):
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=dims, feature_group_count=groups)

    x, k = jnp.ones(x_shape), jnp.ones(k_shape)
    cotangent = jnp.ones(jax.eval_shape(conv, x, k).shape)
    traced = jax.jit(lambda x, k, ct: (conv(x, k), jax.vjp(conv, x, k)[1](ct))).trace(x, k, cotangent)
    assert step_flops(traced) == _xla_flops(traced)


def test_loops_and_branches():
    a = jnp.ones((4, 8))

    def scanned(a):
        return jax.lax.scan(lambda c, _: (c @ jnp.ones((8, 8)), None), a, length=3)[0]

    assert step_flops(jax.jit(scanned).trace(a)) == 3 * 2 * 4 * 8 * 8
    # A cond costs its dearer branch.
    branches = jax.jit(
        lambda p, a: jax.lax.cond(p, lambda a: a @ jnp.ones((8, 2)), lambda a: (a @ jnp.ones((8, 1))) * jnp.ones(2), a)
    )
    assert step_flops(branches.trace(True, a)) == 2 * 4 * 8 * 2


def test_work_inside_nested_jits_and_remat_counts():
    # The UNet's blocks under gradient checkpointing are remat calls; a jitted helper is a pjit: both hold sub-jaxprs.
    inner = jax.jit(lambda a, b: a @ b)

    def f(a, b):
        return inner(a, b), jax.checkpoint(lambda a: a @ b)(a)

    traced = jax.jit(f).trace(jnp.ones((4, 8)), jnp.ones((8, 2)))
    assert step_flops(traced) == 2 * (2 * 4 * 8 * 2) == _xla_flops(traced)


def test_flops_are_per_device_when_split():
    traced = jax.jit(lambda a, b: a @ b).trace(jnp.ones((64, 32)), jnp.ones((32, 16)))
    assert step_flops(traced, 8) == 2 * 64 * 32 * 16 / 8


def test_no_dense_work_gives_none():
    assert step_flops(jax.jit(lambda a: a * 2).trace(jnp.ones(3))) is None


@pytest.mark.parametrize(
    "kind, dtype, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.5),  # H100 SXM data sheet: 1,979 sparse
        ("NVIDIA H100 80GB HBM3", "no", 494.5),  # TF32: 989 sparse
        ("NVIDIA H100 PCIe", "fp16", 756.5),
        ("NVIDIA H100 NVL", "bf16", 835.5),  # not the SXM figure, though its name holds "h100"
        ("NVIDIA H200", "bf16", 989.5),
        ("NVIDIA H200 NVL", "no", 417.5),
        ("NVIDIA A100-SXM4-80GB", "no", 156),
        ("NVIDIA A100-SXM4-40GB", jnp.bfloat16, 312),
        ("TPU v4", "bf16", 275),
        ("TPU v5 lite", "bf16", 197),
        ("TPU v5", "bf16", 459),
        ("TPU v6 lite", "bf16", 918),
    ],
)
def test_peak_from_device_kind(kind, dtype, tflops):
    assert peak_flops(types.SimpleNamespace(device_kind=kind), dtype) == pytest.approx(tflops * 1e12)


def test_unknown_device_has_no_peak_and_no_mfu():
    assert peak_flops(jax.devices()[0], "no") is None  # CPU
    assert mfu(1e12, 1.0, jax.devices(), "no") is None


def test_mfu_is_achieved_over_peak():
    h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
    # 98.95 TFLOP in 0.5 s on one chip = 197.9 TFLOP/s = 20 % of 989.5.
    assert mfu(98.95e12, 0.5, [h100, h100], "bf16") == pytest.approx(0.2)
    assert mfu(None, 0.5, h100, "bf16") is None


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="int8"):
        peak_flops(types.SimpleNamespace(device_kind="TPU v4"), "int8")
