"""FLOPs from XLA's cost analysis against counts worked out by hand; the peak table; MFU arithmetic."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from uncond_flax.flops import mfu, peak_flops, step_flops


def test_matmul_flops_are_2mnk():
    m, k, n = 64, 32, 16
    compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
    assert step_flops(compiled) == 2 * m * n * k


def test_same_padded_conv_counts_only_taps_inside_the_image():
    # 3x3 SAME conv on 8x8: along one axis the 2 edge outputs see 2 taps, the 6 others 3 -> 22 per axis.
    b, c_in, c_out = 2, 4, 5
    x, k = jnp.ones((b, 8, 8, c_in)), jnp.ones((3, 3, c_in, c_out))
    conv = jax.jit(
        lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    )
    assert step_flops(conv.lower(x, k).compile()) == 2 * b * (22 * 22) * c_in * c_out


def test_flops_are_per_device_when_the_batch_is_sharded():
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    a = jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P("data")))
    compiled = jax.jit(lambda a, b: a @ b).lower(a, jnp.ones((32, 16))).compile()
    assert step_flops(compiled) == 2 * 64 * 32 * 16 / len(jax.devices())


def test_no_cost_analysis_gives_none():
    assert step_flops(types.SimpleNamespace(cost_analysis=lambda: None)) is None


@pytest.mark.parametrize(
    "kind, dtype, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.5),  # H100 SXM data sheet: 1,979 sparse
        ("NVIDIA H100 80GB HBM3", "no", 494.5),  # TF32: 989 sparse
        ("NVIDIA H100 PCIe", "fp16", 756.5),
        ("NVIDIA H200", "bf16", 989.5),
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
