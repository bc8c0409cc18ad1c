"""The spatial self-attention block of UNet2DModel (diffusers' `Attention` with group norm and residual)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from uncond_flax.models.layers import current_implementation, group_norm, linear


def attention_per_head(q_BTNH: jax.Array, k_BTNH: jax.Array, v_BTNH: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T * scale) v one head at a time, as jax.nn.dot_product_attention's XLA path computes it.

    All heads at once, XLA:CPU writes and rereads every head's T x T logits through memory (and keeps them for
    the backward pass); one head's logits stay in cache, and the backward pass recomputes them. 2-5x faster
    forward + backward on CPU at T = 256.
    """

    def one_head(qkv):
        q_BTH, k_BTH, v_BTH = qkv
        logits_BTS = jnp.einsum("bth,bsh->bts", q_BTH, k_BTH, preferred_element_type=jnp.float32) * scale
        probs_BTS = jax.nn.softmax(logits_BTS, axis=-1).astype(v_BTH.dtype)
        return jnp.einsum("bts,bsh->bth", probs_BTS, v_BTH)

    heads_first = lambda x: jnp.moveaxis(x, 2, 0)
    out_NBTH = jax.lax.map(jax.checkpoint(one_head), (heads_first(q_BTNH), heads_first(k_BTNH), heads_first(v_BTNH)))
    return jnp.moveaxis(out_NBTH, 0, 2)


# Logits per loop step of attention_blockwise: 1 Mi floats (4 MiB), 16 (image, head) pairs at 256 tokens. With one
# pair per step (256 KiB, a core's L2) XLA:CPU hands each small op of the loop to whichever pool thread is free, and
# on two cores the chain hops between them: the small UNet's step took 0.139 s against 0.126-0.129 s with 8-32 pairs
# per step (64: 0.137); on one pinned core one pair was 1-3 % faster (bench/bench_train_step.py, README).
BLOCK_LOGITS = 1 << 20


def _largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of `n` up to `limit` (at least 1)."""
    return max(d for d in range(1, min(n, max(1, limit)) + 1) if n % d == 0)


def _pairs_per_block(pairs: int, tokens: int) -> int:
    """The largest divisor of `pairs` whose logits fit BLOCK_LOGITS (at least 1)."""
    return _largest_divisor(pairs, BLOCK_LOGITS // (tokens * tokens))


def _no_layout_fold(x: jax.Array) -> jax.Array:
    # XLA:CPU folds a transpose next to a dot into the dot's operand or result layout, and some of those layouts
    # run 5x slower (a 256 x 256 by 256 x 8 product contracting the logits' major axis: 8 vs 50 GFLOP/s). The
    # barrier keeps the transpose a separate, cheap copy.
    return jax.lax.optimization_barrier(x)


@jax.custom_vjp
def _blockwise_core(q_GCTH: jax.Array, kT_GCHS: jax.Array, v_GCSH: jax.Array) -> jax.Array:
    return _blockwise_fwd(q_GCTH, kT_GCHS, v_GCSH)[0]


# Independent chains per loop step of attention_blockwise: each step's pairs are split into this many groups whose
# products and softmaxes share nothing, so XLA:CPU's executor runs them on different pool threads at once (one chain
# of 50-100 us ops kept one core busy while the other mostly waited: the attention ran 1.2x faster on two cores than
# on one, the rest of the step 1.7x). The small UNet's step on two cores: 0.101-0.104 s against 0.110-0.114 with one
# chain (torch 0.166-0.170: 0.61x against 0.66-0.67x); AVX2 0.114 against 0.128; one pinned core 0.178 against
# 0.179; the digits and default UNets unchanged (bench/bench_train_step.py --jax "attention_chains=1" --jax "").
CHAINS = 4
# The fewest logits a chain gets: a split only where each chain's ops are long enough to run apart. At 16 tokens (the
# digits UNet's 4 px attention) a chain of 16 pairs holds 4 Ki logits and its ops take 2-8 us, mostly YNNPACK's and
# the executor's cost per op: the digits UNet's forward pass at batch 16, what its sampler runs, took 2.32 against
# 2.48 ms with one chain instead of four (three runs: 5-8 %). Its train step (batch 64: one loop step of 64 Ki
# logits) and the default UNet's at batch 4 ran alike; the small UNet's (256 Ki per chain) keeps its four
# (a `/tmp` script; bench/bench_train_step.py --jax "attention_min_chain_logits=1" --jax ""; README).
MIN_CHAIN_LOGITS = 1 << 16


def _chain_count(pairs: int, tokens: int) -> int:
    """The largest divisor of `pairs` up to CHAINS whose chains hold at least MIN_CHAIN_LOGITS logits each (at
    least 1)."""
    return _largest_divisor(pairs, min(CHAINS, pairs * tokens * tokens // MIN_CHAIN_LOGITS))


def _in_chains(block: Callable[..., tuple], arrays: tuple) -> tuple:
    """`block` applied to `_chain_count` equal slices of the pair axis (the leading one), outputs concatenated."""
    pairs, tokens = arrays[0].shape[:2]
    n = _chain_count(pairs, tokens)
    size = pairs // n
    outs = [block(*(a[i * size : (i + 1) * size] for a in arrays)) for i in range(n)]
    return tuple(jnp.concatenate(parts, axis=0) if n > 1 else parts[0] for parts in zip(*outs))


def _forward_block(q_CTH, kT_CHS, v_CSH):
    logits_CTS = jnp.einsum("cth,chs->cts", q_CTH, kT_CHS)
    peak_CT1 = jnp.max(logits_CTS, axis=-1, keepdims=True)
    e_CTS = jnp.exp(logits_CTS - peak_CT1)
    total_CT1 = jnp.sum(e_CTS, axis=-1, keepdims=True)
    out_CTH = jnp.einsum("cts,csh->cth", e_CTS, v_CSH) / total_CT1
    return out_CTH, peak_CT1 + jnp.log(total_CT1)


def _backward_block(q_CTH, kT_CHS, v_CSH, out_CTH, logsumexp_CT1, dout_CTH):
    # The probabilities again, from the saved log-sum-exp: no T x T array is kept between the passes.
    probs_CTS = jnp.exp(jnp.einsum("cth,chs->cts", q_CTH, kT_CHS) - logsumexp_CT1)
    # Products contracting the tokens of both operands ("cth,cts->chs") run in XLA's own single-threaded GEMM;
    # with the small operand transposed first they are plain batched products that YNNPACK runs.
    dvT_CHS = jnp.einsum("cht,cts->chs", _no_layout_fold(jnp.swapaxes(dout_CTH, 1, 2)), probs_CTS)
    dprobs_CTS = jnp.einsum("cth,chs->cts", dout_CTH, _no_layout_fold(jnp.swapaxes(v_CSH, 1, 2)))
    # softmax's vjp: p * (dp - sum_s p dp), where sum_s p dp = sum_h out * dout.
    dlogits_CTS = probs_CTS * (dprobs_CTS - jnp.sum(out_CTH * dout_CTH, axis=-1, keepdims=True))
    dq_CTH = jnp.einsum("cts,csh->cth", dlogits_CTS, jnp.swapaxes(kT_CHS, 1, 2))
    dkT_CHS = jnp.einsum("cht,cts->chs", _no_layout_fold(jnp.swapaxes(q_CTH, 1, 2)), dlogits_CTS)
    return dq_CTH, dkT_CHS, jnp.swapaxes(_no_layout_fold(dvT_CHS), 1, 2)


def _blockwise_fwd(q_GCTH, kT_GCHS, v_GCSH):
    out_GCTH, logsumexp_GCT1 = jax.lax.map(lambda qkv: _in_chains(_forward_block, qkv), (q_GCTH, kT_GCHS, v_GCSH))
    return out_GCTH, (q_GCTH, kT_GCHS, v_GCSH, out_GCTH, logsumexp_GCT1)


def _blockwise_bwd(residuals, dout_GCTH):
    return jax.lax.map(lambda args: _in_chains(_backward_block, args), (*residuals, dout_GCTH))


_blockwise_core.defvjp(_blockwise_fwd, _blockwise_bwd)


def attention_blockwise(q_BTNH: jax.Array, k_BTNH: jax.Array, v_BTNH: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T * scale) v in float32, a few (image, head) pairs at a time, with a hand-written backward pass.

    Each loop step holds at most BLOCK_LOGITS logits; the backward pass recomputes the probabilities from the
    forward's log-sum-exp, and keys and values are fed to the products transposed where XLA:CPU's GEMMs are fast.
    On CPU, forward + backward at 256 tokens x 8 heads of 8 is ~2x faster than `attention_per_head` and on par
    with torch's scaled_dot_product_attention (bench/bench_layers.py).
    """
    b, t, n, h = q_BTNH.shape
    c = _pairs_per_block(b * n, t)
    groups = lambda x: jnp.moveaxis(x.astype(jnp.float32), 2, 1).reshape(b * n // c, c, t, h)
    kT_GCHS = _no_layout_fold(jnp.swapaxes(groups(k_BTNH), 2, 3))
    out_GCTH = _blockwise_core(groups(q_BTNH) * scale, kT_GCHS, groups(v_BTNH))
    return jnp.moveaxis(out_GCTH.reshape(b, n, t, h), 1, 2)


def _dot_product_attention(q_BTNH: jax.Array, k_BTNH: jax.Array, v_BTNH: jax.Array, scale: float, impl: str):
    if impl == "blockwise" or (impl == "auto" and jax.default_backend() == "cpu"):
        return attention_blockwise(q_BTNH, k_BTNH, v_BTNH, scale)
    if impl == "per_head":
        return attention_per_head(q_BTNH, k_BTNH, v_BTNH, scale)
    return jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH, scale=scale)


class Attention(nnx.Module):
    """GroupNorm -> multi-head self-attention over H*W tokens -> to_out -> + residual, / rescale factor."""

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        norm_num_groups: int | None,
        eps: float = 1e-5,
        rescale_output_factor: float = 1.0,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if heads < 1:
            raise ValueError(f"attention_head_dim={dim_head} is larger than the {query_dim} channels it attends over")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner_dim = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.impl = current_implementation("attention")
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = group_norm(query_dim, norm_num_groups, eps, **kw) if norm_num_groups is not None else None
        self.to_q = linear(query_dim, inner_dim, **kw)
        self.to_k = linear(query_dim, inner_dim, **kw)
        self.to_v = linear(query_dim, inner_dim, **kw)
        self.to_out = nnx.List([linear(inner_dim, query_dim, **kw)])

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        b, h, w, c = x_BHWC.shape
        residual = x_BHWC
        x_BTC = x_BHWC.reshape(b, h * w, c)
        if self.group_norm is not None:
            x_BTC = self.group_norm(x_BTC)
        split = lambda y: y.reshape(b, h * w, self.heads, self.dim_head)
        q, k, v = split(self.to_q(x_BTC)), split(self.to_k(x_BTC)), split(self.to_v(x_BTC))
        if q.dtype == jnp.float16 and jax.default_backend() == "cpu":
            # XLA:CPU has no float16 x float16 -> float32 dot; compute this block in float32 there.
            q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
        # Logits and softmax run in float32 even for bf16/fp16 inputs (diffusers' upcast_softmax=True).
        out_BTNH = _dot_product_attention(q, k, v, self.dim_head**-0.5, self.impl).astype(x_BTC.dtype)
        out_BTC = self.to_out[0](out_BTNH.reshape(b, h * w, self.heads * self.dim_head))
        return (out_BTC.reshape(b, h, w, c) + residual) / self.rescale_output_factor
