"""Optimizer pieces matching diffusers' train_unconditional.py: LR schedules, clip + AdamW, fp16 loss scaling.

Counting convention. ``schedule(count)`` takes the number of optimizer updates already applied, so update ``k``
(0-based) uses ``lambda(k)``: the same as torch calling ``optimizer.step()`` then ``lr_scheduler.step()``. The very
first update therefore runs at ``lambda(0)``, which is 0 for every warmup schedule, as in diffusers.

What the script logs as ``lr`` is read *after* ``lr_scheduler.step()``, i.e. the lr of the next update:
``lr_schedule_for(config, num_training_steps)(count)`` with ``count`` = updates applied so far, including this one.

fp16 loss scaling lives in ``uncond_flax.loss_scale``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")

# diffusers.optimization.get_scheduler's fixed arguments for the schedules the script can select.
_POLY_LR_END = 1e-7
_POLY_POWER = 1.0
# torch.nn.utils.clip_grad_norm_ adds this to the total norm before dividing.
_CLIP_EPS = 1e-6


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def lr_schedule(name: str, learning_rate: float, num_warmup_steps: int, num_training_steps: int) -> optax.Schedule:
    """``count -> learning_rate * lambda(count)`` in float32, lambda being diffusers' ``get_scheduler(name, ...)``.

    ``count`` may be a traced integer array of any shape (evaluated elementwise).
    """
    if name not in LR_SCHEDULES:
        raise ValueError(f"Unknown lr_scheduler {name!r}; choose one of {', '.join(LR_SCHEDULES)}.")
    lr = float(learning_rate)
    warmup = int(num_warmup_steps)
    total = int(num_training_steps)
    if name == "polynomial" and not lr > _POLY_LR_END:
        # diffusers refuses this at scheduler construction; fail just as early.
        raise ValueError(f"lr_end ({_POLY_LR_END}) must be smaller than initial lr ({lr})")

    # diffusers divides by max(1, ...) so zero-length phases don't divide by zero.
    warm_div = max(1, warmup)
    decay_div = max(1, total - warmup)

    def warmup_frac(count: jax.Array) -> jax.Array:
        return _f32(count) / warm_div

    def remaining(count: jax.Array) -> jax.Array:
        # 1 - progress, formed from integers so it stays exact near the end of the schedule (where 1 - progress
        # in float32 would lose most of its digits).
        return _f32(decay_div + warmup - count) / decay_div

    def half_cosine(rem: jax.Array) -> jax.Array:
        # 0.5 * (1 + cos(pi * progress)) == sin(pi/2 * (1 - progress))**2 for every progress; the sin form keeps
        # full relative precision as the value approaches 0, where the cos form cancels catastrophically.
        return jnp.square(jnp.sin((0.5 * math.pi) * rem))

    def lam(count: jax.Array) -> jax.Array:
        in_warmup = count < warmup
        if name == "constant":
            return jnp.ones(count.shape, jnp.float32)
        if name == "constant_with_warmup":
            return jnp.where(in_warmup, warmup_frac(count), 1.0)
        if name == "linear":
            return jnp.where(in_warmup, warmup_frac(count), jnp.maximum(0.0, _f32(total - count) / decay_div))
        if name == "cosine":
            # num_cycles = 0.5: one half cosine, which keeps oscillating past num_training_steps (as diffusers').
            return jnp.where(in_warmup, warmup_frac(count), half_cosine(remaining(count)))
        if name == "cosine_with_restarts":
            # get_scheduler passes num_cycles = 1, so its "% 1.0" is the identity on [0, 1); progress >= 1 gives 0.
            done = count - warmup >= decay_div
            return jnp.where(in_warmup, warmup_frac(count), jnp.where(done, 0.0, half_cosine(remaining(count))))
        raise AssertionError(name)

    def schedule(count: jax.Array) -> jax.Array:
        count = jnp.asarray(count, jnp.int32)
        if name == "polynomial":
            # Returned as an lr directly (diffusers' lambda is this divided by lr_init, then LambdaLR multiplies
            # it back). diffusers divides by total - warmup without max(1, .), raising ZeroDivisionError at
            # count == total == warmup; no update within num_training_steps uses it, so give it the final lr.
            decay_steps = total - warmup if total != warmup else 1
            pct_remaining = _f32(total - count) / decay_steps
            decayed = (lr - _POLY_LR_END) * pct_remaining**_POLY_POWER + _POLY_LR_END
            return jnp.where(
                count < warmup, lr * warmup_frac(count), jnp.where(count > total, _POLY_LR_END, decayed)
            ).astype(jnp.float32)
        return (lr * lam(count)).astype(jnp.float32)

    return schedule


def lr_schedule_for(config: Any, num_training_steps: int) -> optax.Schedule:
    """The config's lr schedule; `make_optimizer(config, num_training_steps)` uses `lr(k)` for update k (0-based)."""
    return lr_schedule(config.lr_scheduler, config.learning_rate, config.lr_warmup_steps, num_training_steps)


def global_norm_like_torch(tree: Any) -> jax.Array:
    """L2 norm over all leaves in float32, as torch: per-leaf norms first, then the norm of those."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    norms = jnp.stack([jnp.sqrt(jnp.sum(jnp.square(_f32(x)))) for x in leaves])
    return jnp.sqrt(jnp.sum(jnp.square(norms)))


def clip_by_global_norm_like_torch(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_``: scale by ``min(1, max_norm / (total_norm + 1e-6))``."""
    max_norm = float(max_norm)

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        del params
        coef = jnp.minimum(1.0, max_norm / (global_norm_like_torch(updates) + _CLIP_EPS))
        # torch multiplies unconditionally (no branch on coef < 1); a non-finite norm gives coef 0 / nan, as there.
        updates = jax.tree_util.tree_map(lambda g: (_f32(g) * coef).astype(g.dtype), updates)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(config: Any, num_training_steps: int) -> optax.GradientTransformation:
    """clip_grad_norm_(1.0) then ``torch.optim.AdamW`` with the config's scheduled lr (weight decay on every leaf).

    The schedule counts optimizer updates, as a single-process diffusers run steps it.
    """
    schedule = lr_schedule_for(config, num_training_steps)
    return optax.chain(
        clip_by_global_norm_like_torch(1.0),
        # optax.adamw == torch AdamW: bias-corrected moments, eps added outside the sqrt, and the decoupled decay
        # lr * wd * param with the same scheduled lr. The first update runs at schedule(0).
        optax.adamw(
            learning_rate=schedule,
            b1=config.adam_beta1,
            b2=config.adam_beta2,
            eps=config.adam_epsilon,
            eps_root=0.0,
            weight_decay=config.adam_weight_decay,
            mask=None,
        ),
    )
