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
# (3, 256, 6, 8): 18 pairs, 16 fit BLOCK_LOGITS, so the loop runs 2 steps of 9; the others take one step.
SHAPES = [(3, 16, 4, 8), (2, 64, 3, 8), (2, 256, 2, 8), (5, 36, 7, 4), (3, 256, 6, 8)]


def _float64_reference(q, k, v, probe, scale):
    """softmax(q k^T * scale) v and its vjp for `probe`, in numpy float64, written out (no XLA)."""
    q, k, v, dout = (np.moveaxis(np.asarray(x, np.float64), 2, 1) for x in (q, k, v, probe))  # (B, N, T, H)
    logits = np.einsum("bnth,bnsh->bnts", q, k) * scale
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bnts,bnsh->bnth", probs, v)
    dprobs = np.einsum("bnth,bnsh->bnts", dout, v)
    dlogits = probs * (dprobs - np.sum(probs * dprobs, -1, keepdims=True)) * scale
    grads = (np.einsum("bnts,bnsh->bnth", dlogits, k), np.einsum("bnts,bnth->bnsh", dlogits, q))
    dv = np.einsum("bnts,bnth->bnsh", probs, dout)
    return [np.moveaxis(x, 1, 2) for x in (out, *grads, dv)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", [attention_blockwise, attention_per_head], ids=["blockwise", "per_head"])
def test_cpu_attention_matches_dot_product_attention_forward_and_gradients(impl, shape):
    # Both against a float64 reference. A fixed atol would test jax.nn.dot_product_attention's float32 rounding (at
    # 256 tokens its gradients are ~5e-5 off): ours may be off by 3x the worst of its four results' errors.
    q, k, v, probe = _qkv_and_probe(*shape)
    scale = shape[-1] ** -0.5
    ours = jax.jit(lambda *a: _out_and_grads(lambda q, k, v: impl(q, k, v, scale), *a))(q, k, v, probe)
    xla = jax.jit(lambda *a: _out_and_grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale), *a))(
        q, k, v, probe
    )
    exact = _float64_reference(q, k, v, probe, scale)
    xla_error = max(np.max(np.abs(np.asarray(b, np.float64) - e)) for b, e in zip(xla, exact))
    assert 0 < xla_error < 1e-4
    for name, a, e in zip(("out", "dq", "dk", "dv"), ours, exact):
        np.testing.assert_allclose(np.asarray(a, np.float64), e, atol=3 * xla_error, rtol=0, err_msg=name)


def test_blockwise_groups_pairs_to_fit_the_block_and_divide_the_pairs(monkeypatch):
    # The default block: 16 pairs at 256 tokens (the small UNet's 16 px attention), all 1,024 at 16 tokens.
    assert attention._pairs_per_block(128, 256) == 16
    assert attention._pairs_per_block(64 * 16, 16) == 1024
    assert attention._pairs_per_block(4, 2048) == 1  # one pair is already over the block: still one
    monkeypatch.setattr(attention, "BLOCK_LOGITS", 1 << 16)
    assert attention._pairs_per_block(64 * 16, 16) == 256  # 256 pairs x 16 x 16 logits = BLOCK_LOGITS
    assert attention._pairs_per_block(128, 256) == 1
    assert attention._pairs_per_block(4, 1024) == 1  # one pair is already over the block: still one
    assert attention._pairs_per_block(35, 36) == 35  # 35 x 36 x 36 fits; 35's divisors are 1, 5, 7, 35
    assert attention._pairs_per_block(14, 64) == 14
    assert attention._pairs_per_block(21, 64) == 7  # 16 fit; the largest divisor of 21 up to 16


def test_blockwise_splits_each_loop_step_into_independent_chains(monkeypatch):
    # At 256 tokens a pair holds 64 Ki logits: every pair could be a chain, CHAINS bounds them.
    assert [attention._chain_count(p, 256) for p in (16, 9, 6, 35, 1, 2)] == [4, 3, 3, 1, 1, 2]
    # Fewer logits: no chain under MIN_CHAIN_LOGITS (64 Ki). 16 pairs x 128 tokens = 4 chains of 64 Ki; 8 pairs,
    # 2; the digits UNet's 4 px attention (16 tokens, 4 heads) at batch 16, 64 pairs of 256 logits: one chain; at
    # batch 1,024, 4,096 pairs: 4.
    assert [attention._chain_count(p, 128) for p in (16, 8, 12, 4)] == [4, 2, 3, 1]
    assert [attention._chain_count(p, 16) for p in (64, 256, 512, 4096)] == [1, 1, 2, 4]
    monkeypatch.setattr(attention, "CHAINS", 2)
    assert attention._chain_count(16, 256) == 2
    monkeypatch.setattr(attention, "MIN_CHAIN_LOGITS", 1 << 20)
    assert attention._chain_count(16, 256) == 1
    monkeypatch.undo()

    # The small UNet's 16 px attention: 128 pairs, 16 per loop step, so each step is 4 chains of 4 pairs. Their
    # logits are 4 separate (4, 256, 256) products in the loop's body, forward and backward.
    q, k, v, probe = _qkv_and_probe(16, 256, 8, 8)
    jaxpr = jax.make_jaxpr(lambda *a: _out_and_grads(lambda q, k, v: attention_blockwise(q, k, v, 0.35), *a))(
        q, k, v, probe
    )
    bodies = [eqn.params["jaxpr"].jaxpr for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "scan"]
    assert len(bodies) == 2  # forward, backward

    def logits_products(body):
        return [
            eqn
            for eqn in body.eqns
            if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape[1:] == (256, 256)
        ]

    for body in bodies:
        products = logits_products(body)
        assert {eqn.outvars[0].aval.shape[0] for eqn in products} == {4}
        assert len(products) == 4 * (1 if body is bodies[0] else 2)  # backward: logits and dprobs per chain

    # The digits UNet's sampler: 16 images x 4 heads at 16 tokens, all 64 pairs in one loop step and one chain.
    q, k, v, probe = _qkv_and_probe(16, 16, 4, 16)
    jaxpr = jax.make_jaxpr(lambda *a: _out_and_grads(lambda q, k, v: attention_blockwise(q, k, v, 0.25), *a))(
        q, k, v, probe
    )
    forward = next(eqn.params["jaxpr"].jaxpr for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "scan")
    products = [eqn.outvars[0].aval.shape for eqn in forward.eqns if eqn.primitive.name == "dot_general"]
    assert products == [(64, 16, 16), (64, 16, 16)]  # the logits, the output


def test_blockwise_computes_in_float32_for_bfloat16_inputs():
    q, k, v, probe = _qkv_and_probe(2, 64, 2, 8, jnp.bfloat16)
    out = attention_blockwise(q, k, v, 8**-0.5)
    ref = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), scale=8**-0.5)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
    grads = jax.grad(lambda q, k, v: jnp.sum(attention_blockwise(q, k, v, 8**-0.5) * probe), (0, 1, 2))(q, k, v)
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
