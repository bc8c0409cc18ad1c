"""`conv_auto`, the CPU default for Conv layers: the matmul form where the output is smaller than the kernel or
has few rows (batch x height x width)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from uncond_flax.models.layers import CONV_IMPLS, CONV_MATMUL_MAX_ROWS, conv_auto

DN = ("NHWC", "HWIO", "NHWC")


def _uses_conv_op(fn, *args) -> bool:
    return "conv_general_dilated" in str(jax.make_jaxpr(fn)(*args))


# (resolution, kernel, stride, batch, matmul form on CPU?). 2 px and a stride-2 3x3 from 4 px give outputs under 3x3,
# at any batch. Otherwise the output's rows decide: 8 px x batch 2 is 128 rows (matmul), batch 3 is 192 (the op); a
# 1x1 kernel at 2 px x batch 32 is 128 rows, at batch 33 132; stride 2 from 8 px (4 px out) x batch 8 is 128, x 9 is
# 144; 3 px outputs x batch 15, 135 rows.
CASES = [
    (2, 3, 1, 40, True),
    (4, 3, 2, 40, True),
    (8, 3, 1, 2, True),
    (8, 3, 1, 3, False),
    (2, 1, 1, 32, True),
    (2, 1, 1, 33, False),
    (3, 3, 1, 15, False),
    (6, 3, 2, 15, False),
    (8, 3, 2, 8, True),
    (8, 3, 2, 9, False),
]


@pytest.mark.parametrize("res, k, stride, batch, as_matmul", CASES, ids=lambda v: str(v))
def test_conv_auto_matches_the_convolution_and_picks_the_matmul_below_the_kernel_or_few_rows(
    res, k, stride, batch, as_matmul
):
    assert CONV_MATMUL_MAX_ROWS == 128  # the cases above straddle it
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (batch, res, res, 24))
    w = jax.random.normal(keys[1], (k, k, 24, 40)) * 0.1
    pad = ((k // 2, k // 2),) * 2 if stride == 1 else ((0, 1), (0, 1))  # diffusers' Downsample2D(padding=0) pads
    probe = jax.random.normal(keys[2], lax.conv_general_dilated(x, w, (stride,) * 2, pad, dimension_numbers=DN).shape)

    def out_and_grads(impl):
        loss = lambda x, w: jnp.sum(impl(x, w, (stride, stride), pad, dimension_numbers=DN) * probe)
        return impl(x, w, (stride, stride), pad, dimension_numbers=DN), *jax.grad(loss, (0, 1))(x, w)

    for ours, ref in zip(out_and_grads(conv_auto), out_and_grads(lax.conv_general_dilated)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-5, rtol=2e-5)
    uses_op = _uses_conv_op(lambda x, w: conv_auto(x, w, (stride, stride), pad, dimension_numbers=DN), x, w)
    assert uses_op == (not as_matmul or jax.default_backend() != "cpu")
    assert CONV_IMPLS["auto"] is conv_auto
