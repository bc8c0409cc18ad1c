"""The spatial self-attention block of UNet2DModel (diffusers' `Attention` with group norm and residual)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uncond_flax.models.layers import group_norm, linear


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
        split = lambda y: y.reshape(b, h * w, self.heads, self.dim_head)  # noqa: E731
        q, k, v = split(self.to_q(x_BTC)), split(self.to_k(x_BTC)), split(self.to_v(x_BTC))
        if q.dtype == jnp.float16 and jax.default_backend() == "cpu":
            # XLA:CPU has no float16 x float16 -> float32 dot; compute this block in float32 there.
            q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
        # Logits and softmax run in float32 even for bf16/fp16 inputs (diffusers' upcast_softmax=True).
        out_BTNH = jax.nn.dot_product_attention(q, k, v, scale=self.dim_head**-0.5).astype(x_BTC.dtype)
        out_BTC = self.to_out[0](out_BTNH.reshape(b, h * w, self.heads * self.dim_head))
        return (out_BTC.reshape(b, h, w, c) + residual) / self.rescale_output_factor
