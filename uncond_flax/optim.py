"""Optimizer pieces matching diffusers' train_unconditional.py: LR schedules, clip + AdamW, fp16 loss scaling.

Counting convention. ``schedule(count)`` takes the number of optimizer updates already applied, so update ``k``
(0-based) uses ``lambda(k)``: the same as torch calling ``optimizer.step()`` then ``lr_scheduler.step()``. The very
first update therefore runs at ``lambda(0)``, which is 0 for every warmup schedule, as in diffusers.

What the script logs as ``lr`` is read *after* ``lr_scheduler.step()``, i.e. the lr of the next update:
``lr_schedule_for(config, num_training_steps)(count)`` with ``count`` = updates applied so far, including this one.

fp16 loss scaling lives in ``uncond_flax.loss_scale``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from uncond_flax.errors import check_choice

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

    Equal to diffusers' to float32 rounding (a few 1e-7 of the peak lr) for every count from 0 to
    ``num_training_steps``, the counts training uses; ``count`` may be an integer array of any shape.
    """
    check_choice("lr_scheduler", name, LR_SCHEDULES)
    lr = float(learning_rate)
    warmup = 0 if name == "constant" else int(num_warmup_steps)  # diffusers' constant has no warmup
    decay = int(num_training_steps) - warmup
    if name == "polynomial" and not lr > _POLY_LR_END:
        # diffusers refuses this at scheduler construction; fail just as early.
        raise ValueError(f"lr_end ({_POLY_LR_END}) must be smaller than initial lr ({lr})")
    # What follows the warmup. Each optax form equals diffusers' where the decay has steps; where the warmup
    # fills the whole run, diffusers' lr at count == warmup (only logged, after the last update) is kept by hand.
    if name in ("constant", "constant_with_warmup"):
        after = optax.constant_schedule(lr)
    elif name == "linear":
        after = optax.linear_schedule(lr, 0.0, decay) if decay > 0 else optax.constant_schedule(0.0)
    elif name == "polynomial":
        # diffusers divides by zero at count == warmup == total; lr_end, which it has one count later, here.
        after = (
            optax.polynomial_schedule(lr, _POLY_LR_END, _POLY_POWER, decay)
            if decay > 0
            else optax.constant_schedule(_POLY_LR_END)
        )
    else:
        # cosine (num_cycles 0.5) and cosine_with_restarts (num_cycles 1) are the same half cosine up to
        # num_training_steps. Past it diffusers' cosine rises again (no update runs there) while its restarts
        # schedule stays at 0, as optax's does. A zero-length decay starts at lr, as diffusers' max(1, .) does.
        after = optax.cosine_decay_schedule(lr, max(1, decay))
    joined = after if warmup == 0 else optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])

    def schedule(count: jax.Array) -> jax.Array:
        count = jnp.asarray(count, jnp.int32)
        return jnp.broadcast_to(_f32(joined(count)), count.shape)

    return schedule


def lr_schedule_for(config: Any, num_training_steps: int) -> optax.Schedule:
    """The config's lr schedule; `make_optimizer(config, num_training_steps)` uses `lr(k)` for update k (0-based)."""
    return lr_schedule(config.lr_scheduler, config.learning_rate, config.lr_warmup_steps, num_training_steps)


# How the gradient norm is reduced (the `grad_norm_reduction` config field); the same norm up to float32 rounding.
# "per_leaf" is torch's clip_grad_norm_: each leaf's norm, then the norm of those. "concat" lays all leaves end to end
# and reduces once: for the default UNet's 450 leaves, 2 fused ops instead of ~550 kernels on an H100 (1,199 fusions
# on CPU). At batch 64 that GPU sat idle 39-45 % of the step waiting for its host (README, Benchmarks); measured there
# only together with a concatenated AdamW update (a variant, dropped): 43.3 against 45.7 ms, within what one run can
# tell. On CPU the norm alone is 9x slower (380 instead of 42 ms: it copies the 455 MB of gradients), the whole step
# no slower measurably (5.73 against 5.90 s at batch 4). With fsdp > 1 the copy gathers the sharded gradients.
GRAD_NORM_REDUCTIONS = ("per_leaf", "concat")


def global_norm_like_torch(tree: Any, reduction: str = "per_leaf") -> jax.Array:
    """L2 norm over all leaves in float32, as torch: per-leaf norms first, then the norm of those; or, with
    `reduction="concat"`, of all leaves laid end to end (GRAD_NORM_REDUCTIONS)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    if reduction == "concat":
        return jnp.sqrt(jnp.sum(jnp.square(jnp.concatenate([jnp.ravel(_f32(x)) for x in leaves]))))
    check_choice("grad_norm_reduction", reduction, GRAD_NORM_REDUCTIONS)
    norms = jnp.stack([jnp.sqrt(jnp.sum(jnp.square(_f32(x)))) for x in leaves])
    return jnp.sqrt(jnp.sum(jnp.square(norms)))


def clip_by_global_norm_like_torch(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """``torch.nn.utils.clip_grad_norm_``: scale by ``min(1, max_norm / (total_norm + 1e-6))``.

    `update(..., global_norm=n)` uses `n`, the caller's `global_norm_like_torch(updates)`, instead of computing it
    again (the train step logs it too: one pass over the gradients instead of two).
    """
    max_norm = float(max_norm)

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(
        updates: Any, state: optax.EmptyState, params: Any = None, *, global_norm: jax.Array | None = None, **extra
    ) -> tuple[Any, optax.EmptyState]:
        del params, extra
        total_norm = global_norm_like_torch(updates) if global_norm is None else global_norm
        coef = jnp.minimum(1.0, max_norm / (total_norm + _CLIP_EPS))
        # torch multiplies unconditionally (no branch on coef < 1); a non-finite norm gives coef 0 / nan, as there.
        updates = jax.tree_util.tree_map(lambda g: (_f32(g) * coef).astype(g.dtype), updates)
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
