"""The spatial self-attention block of UNet2DModel (diffusers' `Attention` with group norm and residual)."""

from __future__ import annotations

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


def _dot_product_attention(q_BTNH: jax.Array, k_BTNH: jax.Array, v_BTNH: jax.Array, scale: float, impl: str):
    if impl == "per_head" or (impl == "auto" and jax.default_backend() == "cpu"):
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
