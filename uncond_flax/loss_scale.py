"""fp16 dynamic loss scaling as ``torch.amp.GradScaler`` does it (what accelerate uses), and the no-op for fp32/bf16.

A train step that reproduces GradScaler::

    grads = jax.grad(lambda p: loss_scale.scale_loss(loss_fn(p)))(params)
    grads = loss_scale.unscale(grads)
    # GradScaler checks every element; the norm is non-finite exactly then, short of its float32 overflow (~1.8e19)
    finite = jnp.isfinite(global_norm_like_torch(grads))  # as uncond_flax.step does, in every precision
    updates, new_opt_state = tx.update(grads, opt_state, params)
    # GradScaler skips optimizer.step() on overflow, and accelerate then skips lr_scheduler.step() too:
    # keeping the old opt_state keeps both optax counts (Adam's and the schedule's) where they were.
    params, opt_state = select_tree(finite, (new_params, new_opt_state), (params, opt_state))
    loss_scale = loss_scale.update(finite)
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from uncond_flax.errors import check_choice


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


@struct.dataclass
class DynamicLossScale:
    """``torch.amp.GradScaler``'s dynamic loss scale: back off on overflow, grow after growth_interval good steps."""

    scale: jax.Array  # float32 scalar
    good_steps: jax.Array  # int32 scalar; GradScaler's _growth_tracker
    growth_factor: float = struct.field(pytree_node=False, default=2.0)
    backoff_factor: float = struct.field(pytree_node=False, default=0.5)
    growth_interval: int = struct.field(pytree_node=False, default=2000)

    is_dynamic: ClassVar[bool] = True

    @classmethod
    def create(
        cls,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> "DynamicLossScale":
        """A fresh scale with GradScaler's defaults."""
        return cls(
            scale=jnp.asarray(init_scale, jnp.float32),
            good_steps=jnp.zeros((), jnp.int32),
            growth_factor=float(growth_factor),
            backoff_factor=float(backoff_factor),
            growth_interval=int(growth_interval),
        )

    def scale_loss(self, loss: jax.Array) -> jax.Array:
        """``loss * scale`` in float32, as GradScaler's fp32 scale promotes a 0-d loss (2**16 overflows fp16)."""
        return _f32(loss) * self.scale

    def unscale(self, grads: Any) -> Any:
        """Multiply every leaf by ``1 / scale`` (computed in float32, cast back to the leaf's dtype)."""
        inv = 1.0 / self.scale
        return jax.tree_util.tree_map(lambda g: (_f32(g) * inv).astype(g.dtype), grads)

    def update(self, grads_finite: jax.Array) -> "DynamicLossScale":
        """GradScaler.update(): scale *= backoff and reset on overflow; else count, growing every growth_interval."""
        grads_finite = jnp.asarray(grads_finite, jnp.bool_)
        good = self.good_steps + 1
        grow = good >= self.growth_interval
        grown = self.scale * self.growth_factor
        # GradScaler keeps the old scale if growing it would overflow float32.
        grown = jnp.where(jnp.isfinite(grown), grown, self.scale)
        scale = jnp.where(grads_finite, jnp.where(grow, grown, self.scale), self.scale * self.backoff_factor)
        good_steps = jnp.where(grads_finite & ~grow, good, 0).astype(jnp.int32)
        return self.replace(scale=scale.astype(jnp.float32), good_steps=good_steps)


@struct.dataclass
class NoLossScale:
    """Stand-in for fp32 / bf16: identity scaling, no state (torch has no GradScaler there)."""

    is_dynamic: ClassVar[bool] = False

    @classmethod
    def create(cls) -> "NoLossScale":
        """The (stateless) no-op loss scale."""
        return cls()

    def scale_loss(self, loss: jax.Array) -> jax.Array:
        """The loss, unchanged."""
        return loss

    def unscale(self, grads: Any) -> Any:
        """The grads, unchanged."""
        return grads

    def update(self, grads_finite: jax.Array) -> "NoLossScale":
        """No state to update."""
        del grads_finite
        return self


LossScale = DynamicLossScale | NoLossScale


def make_loss_scale(mixed_precision: str) -> LossScale:
    """``DynamicLossScale.create()`` for ``"fp16"``, ``NoLossScale()`` for ``"no"`` / ``"bf16"``."""
    if mixed_precision == "fp16":
        return DynamicLossScale.create()
    check_choice("mixed_precision", mixed_precision, ("no", "fp16", "bf16"))
    return NoLossScale()
