"""Linear layers' two products (LINEAR_IMPLS) against torch.nn.Linear, and the CPU form of the kernel's gradient."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from uncond_flax.models.attention import Attention
from uncond_flax.models.layers import LINEAR_IMPLS, dense_dot, implementations, linear


def _torch_linear(x, weight_IO, bias, probe):
    """torch's output and the gradients of sum(out * probe) for x, the (in, out) kernel and the bias."""
    module = torch.nn.Linear(*weight_IO.shape)
    module.weight.data, module.bias.data = torch.from_numpy(weight_IO.T.copy()), torch.from_numpy(bias)
    x_t = torch.from_numpy(x).requires_grad_(True)
    out = module(x_t)
    (out * torch.from_numpy(probe)).sum().backward()
    return out.detach().numpy(), x_t.grad.numpy(), module.weight.grad.numpy().T, module.bias.grad.numpy()


@pytest.mark.parametrize("impl", sorted(LINEAR_IMPLS))
@pytest.mark.parametrize("shape", [(6, 20), (3, 40, 20), (2, 4, 5, 20)], ids=lambda s: "x".join(map(str, s)))
def test_linear_matches_torch_forward_and_gradients(impl, shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    weight, bias = (rng.standard_normal((20, 12)) * 0.3).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    probe = rng.standard_normal((*shape[:-1], 12)).astype(np.float32)
    with implementations(linear=impl):
        layer = linear(20, 12, rngs=nnx.Rngs(0))
    assert layer.dot_general is LINEAR_IMPLS[impl]
    layer.kernel.value, layer.bias.value = jnp.asarray(weight), jnp.asarray(bias)
    graphdef, params = nnx.split(layer)

    def loss(params, x):
        out = nnx.merge(graphdef, params)(x)
        return jnp.sum(out * probe), out

    (g_params, g_x), out = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, jnp.asarray(x))
    out_t, gx_t, gw_t, gb_t = _torch_linear(x, weight, bias, probe)
    np.testing.assert_allclose(np.asarray(out), out_t, atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(g_x), gx_t, atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(g_params["kernel"][...]), gw_t, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_params["bias"][...]), gb_t, atol=1e-4, rtol=1e-5)


def test_dense_dot_gradients_keep_the_operands_dtypes_in_bfloat16():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 16)), jnp.bfloat16)
    w = jnp.asarray(np.random.default_rng(2).standard_normal((16, 4)), jnp.bfloat16)
    dims = (((1,), (0,)), ((), ()))
    ours = jax.grad(lambda x, w: jnp.sum(dense_dot(x, w, dims).astype(jnp.float32) ** 2), (0, 1))(x, w)
    plain = jax.grad(lambda x, w: jnp.sum(jax.lax.dot_general(x, w, dims).astype(jnp.float32) ** 2), (0, 1))(x, w)
    assert [g.dtype for g in ours] == [g.dtype for g in plain] == [jnp.bfloat16] * 2
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=1e-2)


def _kernel_gradient_contractions(impl: str) -> list[str]:
    """The contracting dims of each (64, 64) product in the compiled gradient of an attention block (8 heads of 8,
    256 tokens, as in the small UNet): the four projections' kernel gradients."""
    with implementations(linear=impl):
        block = Attention(64, heads=8, dim_head=8, norm_num_groups=32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(block)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)))
    hlo = grad.lower(params, jnp.ones((4, 16, 16, 64))).compile().as_text()
    return re.findall(r"= f32\[64,64\]\S* dot\(.*?(lhs_contracting_dims=\{\d\}, rhs_contracting_dims=\{\d\})", hlo)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the plain kernel-gradient product is the CPU form")
def test_on_cpu_the_kernel_gradient_is_a_plain_product_where_xla_would_fold_a_transpose_into_it():
    # The plain product: (C, N) @ (N, O), contracting the left operand's minor axis and the right one's major.
    plain = "lhs_contracting_dims={1}, rhs_contracting_dims={0}"
    ours = _kernel_gradient_contractions("auto")
    assert ours == [plain] * 4, ours
    # Left to autodiff, XLA:CPU contracts both operands' row axes, the output gradient transposed (the heads' layout):
    # the form that ran at ~40 GFLOP/s. Should a later XLA stop doing so, this workaround may be dropped.
    folded = _kernel_gradient_contractions("dot")
    assert len(folded) == 4 and plain not in folded, folded
