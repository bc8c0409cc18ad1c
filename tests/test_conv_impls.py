"""`conv_auto`, the CPU default for Conv layers: the matmul form where the output is smaller than the kernel or
has few rows (batch x height x width)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from uncond_flax.models.layers import CONV_IMPLS, CONV_MATMUL_MAX_ROWS, conv_auto, implementations

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


@pytest.mark.parametrize("mode", ["phases", "nearest_conv"])
@pytest.mark.parametrize("shape", [(2, 5, 6, 8), (3, 4, 4, 16), (1, 1, 3, 4)])
def test_upsample_conv_forms_match_diffusers_upsample2d(mode, shape, monkeypatch):
    # Upsample2D as diffusers computes it (nearest 2x, then a 3x3 conv with padding 1): both forms, forward and
    # the gradients of x, kernel and bias; odd and one-pixel sizes check the phases' padding at each border.
    import torch
    from diffusers.models.upsampling import Upsample2D as TorchUpsample2D
    from flax import nnx

    from uncond_flax.models import resnet

    rng = np.random.default_rng(5)
    channels = shape[-1]
    x = rng.standard_normal(shape).astype(np.float32)
    theirs = TorchUpsample2D(channels, use_conv=True).float()
    with torch.no_grad():
        theirs.conv.weight.copy_(torch.from_numpy(rng.standard_normal((channels, channels, 3, 3)).astype(np.float32)))
        theirs.conv.bias.copy_(torch.from_numpy(rng.standard_normal(channels).astype(np.float32)))
    x_t = torch.from_numpy(np.moveaxis(x, -1, 1).copy()).requires_grad_(True)
    out_t = theirs(x_t)
    probe = rng.standard_normal(out_t.shape).astype(np.float32)
    (out_t * torch.from_numpy(probe)).sum().backward()

    with implementations(upsample=mode):
        ours = resnet.Upsample2D(channels, rngs=nnx.Rngs(0))
    assert ours.impl == mode
    ours.conv.kernel.value = jnp.asarray(np.transpose(theirs.conv.weight.detach().numpy(), (2, 3, 1, 0)))
    ours.conv.bias.value = jnp.asarray(theirs.conv.bias.detach().numpy())
    graphdef, params = nnx.split(ours)

    def loss(params, x):
        out = nnx.merge(graphdef, params)(x)
        return jnp.sum(out * np.moveaxis(probe, 1, -1)), out

    (g_params, g_x), out = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, jnp.asarray(x))
    to_last = lambda a: np.moveaxis(a.detach().numpy(), 1, -1)  # noqa: E731
    np.testing.assert_allclose(np.asarray(out), to_last(out_t), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(g_x), to_last(x_t.grad), atol=1e-4, rtol=0)
    kernel_grad = np.transpose(theirs.conv.weight.grad.numpy(), (2, 3, 1, 0))
    np.testing.assert_allclose(np.asarray(g_params["conv"]["kernel"][...]), kernel_grad, atol=2e-4, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_params["conv"]["bias"][...]), theirs.conv.bias.grad.numpy(), atol=1e-4)


def test_upsample_conv_is_four_small_convolutions_on_cpu():
    # The CPU default convolves x itself with four 2x2 kernels (no upsampled image); elsewhere, as diffusers.
    from flax import nnx

    from uncond_flax.models import resnet

    x = jnp.ones((1, 16, 16, 4))  # 256 rows per phase: convolutions, not conv_auto's matmul form

    def conv_kernels(impl):
        with implementations(upsample=impl):
            up = resnet.Upsample2D(4, rngs=nnx.Rngs(0))
        eqns = jax.make_jaxpr(up)(x).jaxpr.eqns
        return sorted(e.invars[1].aval.shape[:2] for e in eqns if e.primitive.name == "conv_general_dilated")

    assert conv_kernels("auto") == ([(2, 2)] * 4 if jax.default_backend() == "cpu" else [(3, 3)])
    assert conv_kernels("nearest_conv") == [(3, 3)]
    assert conv_kernels("phases") == [(2, 2)] * 4


@pytest.mark.parametrize("mode", ["phases", "nearest_conv"])
def test_upsample_conv_forms_compute_in_the_layers_dtype(mode):
    # Under mixed precision (dtype bf16, float32 parameters) each form multiplies bf16 numbers and returns bf16,
    # close to the float32 result.
    from flax import nnx

    from uncond_flax.models import resnet

    with implementations(upsample=mode):
        up = resnet.Upsample2D(8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        reference = resnet.Upsample2D(8, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 16, 16, 8)), jnp.float32)
    eqns = jax.make_jaxpr(up)(x.astype(jnp.bfloat16)).jaxpr.eqns
    convs = [e for e in eqns if e.primitive.name == "conv_general_dilated"]
    assert convs and all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)
    out = up(x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(reference(x)), atol=0.1, rtol=0.05)
