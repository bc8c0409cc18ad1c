"""The CPU attention paths (`attention_blockwise`, `attention_per_head`) against jax.nn.dot_product_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uncond_flax.models import attention
from uncond_flax.models.attention import attention_blockwise, attention_per_head


def _qkv_and_probe(b, t, n, h, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(3), 4)
    q, k, v, probe = (jax.random.normal(key, (b, t, n, h)) * 2 for key in keys)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), probe


def _out_and_grads(fn, q, k, v, probe):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(probe.astype(out.dtype)))


# (batch, tokens, heads, head_dim): many pairs per loop step (4 px), a few (8 px), one (16 px, 256 tokens), and
# pair counts with awkward divisors.
SHAPES = [(3, 16, 4, 8), (2, 64, 3, 8), (2, 256, 2, 8), (5, 36, 7, 4)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", [attention_blockwise, attention_per_head], ids=["blockwise", "per_head"])
def test_cpu_attention_matches_dot_product_attention_forward_and_gradients(impl, shape):
    q, k, v, probe = _qkv_and_probe(*shape)
    scale = shape[-1] ** -0.5
    ours = jax.jit(lambda *a: _out_and_grads(lambda q, k, v: impl(q, k, v, scale), *a))(q, k, v, probe)
    ref = jax.jit(lambda *a: _out_and_grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale), *a))(
        q, k, v, probe
    )
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5, err_msg=name)


def test_blockwise_groups_pairs_to_fit_the_block_and_divide_the_pairs():
    assert attention._pairs_per_block(64 * 16, 16) == 256  # 256 pairs x 16 x 16 logits = BLOCK_LOGITS
    assert attention._pairs_per_block(128, 256) == 1
    assert attention._pairs_per_block(4, 1024) == 1  # one pair is already over the block: still one
    assert attention._pairs_per_block(35, 36) == 35  # 35 x 36 x 36 fits; 35's divisors are 1, 5, 7, 35
    assert attention._pairs_per_block(14, 64) == 14
    assert attention._pairs_per_block(21, 64) == 7  # 16 fit; the largest divisor of 21 up to 16


def test_blockwise_computes_in_float32_for_bfloat16_inputs():
    q, k, v, probe = _qkv_and_probe(2, 64, 2, 8, jnp.bfloat16)
    out = attention_blockwise(q, k, v, 8**-0.5)
    ref = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), scale=8**-0.5)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
    grads = jax.grad(lambda q, k, v: jnp.sum(attention_blockwise(q, k, v, 8**-0.5) * probe), (0, 1, 2))(q, k, v)
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
