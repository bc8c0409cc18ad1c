"""diffusers' ``EMAModel`` (as train_unconditional.py builds it) as pure, jittable functions.

Calling convention, reproducing ``ema_model.step(model.parameters())``. Keep an int32 counter ``ema_step`` that
starts at 0 (diffusers' ``optimization_step``) and the EMA params, initialised as a float32 copy of the initial
params. Once per optimizer update (every ``accelerator.sync_gradients`` step), after the params were updated::

    ema_step = ema_step + 1                              # diffusers increments first ...
    ema_params, decay = ema_step_update(ema_params, params, ema_step, inv_gamma=..., power=..., max_decay=...)
    # ... then uses get_decay(ema_step): ema_step 1 has decay 0, so the first update copies the params.
    # `decay` is what the script logs as "ema_decay" (EMAModel.cur_decay_value).

The script calls ``ema_model.step`` also on a step that fp16's GradScaler skipped (params unchanged), so the
counter and the average still advance there. train_unconditional.py uses ``use_ema_warmup=True`` with
``inv_gamma=--ema_inv_gamma``, ``power=--ema_power``, ``decay=--ema_max_decay`` and defaults for the rest.

``ema_update(ema, params, decay)`` is the literal formula; ``ema_step_update`` is the same update with ``1 - decay``
computed without cancellation (near decay = 0.9999 a float32 ``decay`` has lost ~3e-4 of ``1 - decay``'s relative
precision, while torch forms ``1 - decay`` in float64), so prefer it in the trainer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _warmup_step(optimization_step: jax.Array, update_after_step: int) -> jax.Array:
    return jnp.maximum(0, jnp.asarray(optimization_step, jnp.int32) - update_after_step - 1)


def ema_one_minus_decay(
    optimization_step: jax.Array,
    *,
    inv_gamma: float = 1.0,
    power: float = 0.75,
    max_decay: float = 0.9999,
    min_decay: float = 0.0,
    update_after_step: int = 0,
    use_warmup: bool = True,
) -> jax.Array:
    """``1 - ema_decay(...)`` in float32, computed directly so it keeps full relative precision as decay -> 1."""
    step = _warmup_step(optimization_step, update_after_step)
    stepf = step.astype(jnp.float32)
    if use_warmup:
        one_minus = (1.0 + stepf / inv_gamma) ** (-float(power))
    else:
        # 1 - (1 + step) / (10 + step)
        one_minus = 9.0 / (10.0 + stepf)
    # min(decay, max_decay) then max(decay, min_decay), in 1 - decay terms; 1 - max_decay is taken in float64 first.
    one_minus = jnp.maximum(one_minus, 1.0 - float(max_decay))
    one_minus = jnp.minimum(one_minus, 1.0 - float(min_decay))
    # diffusers returns decay 0 for step <= 0 before clamping (so min_decay does not apply there).
    return jnp.where(step <= 0, 1.0, one_minus).astype(jnp.float32)


def ema_decay(
    optimization_step: jax.Array,
    *,
    inv_gamma: float = 1.0,
    power: float = 0.75,
    max_decay: float = 0.9999,
    min_decay: float = 0.0,
    update_after_step: int = 0,
    use_warmup: bool = True,
) -> jax.Array:
    """diffusers' ``EMAModel.get_decay(optimization_step)`` in float32 (step is 1-based: already incremented)."""
    one_minus = ema_one_minus_decay(
        optimization_step,
        inv_gamma=inv_gamma,
        power=power,
        max_decay=max_decay,
        min_decay=min_decay,
        update_after_step=update_after_step,
        use_warmup=use_warmup,
    )
    return (1.0 - one_minus).astype(jnp.float32)


def _update(ema_params: Any, params: Any, one_minus_decay: jax.Array) -> Any:
    def leaf(e: jax.Array, p: jax.Array) -> jax.Array:
        # Same operation order as diffusers: s - (1 - decay) * (s - p), in the EMA leaf's dtype.
        return e - one_minus_decay.astype(e.dtype) * (e - p.astype(e.dtype))

    return jax.tree_util.tree_map(leaf, ema_params, params)


def ema_update(ema_params: Any, params: Any, decay: jax.Array) -> Any:
    """One EMA step per leaf: ``ema - (1 - decay) * (ema - param)`` in the EMA leaf's dtype."""
    return _update(ema_params, params, 1.0 - jnp.asarray(decay, jnp.float32))


def ema_step_update(
    ema_params: Any,
    params: Any,
    optimization_step: jax.Array,
    *,
    inv_gamma: float = 1.0,
    power: float = 0.75,
    max_decay: float = 0.9999,
    min_decay: float = 0.0,
    update_after_step: int = 0,
    use_warmup: bool = True,
) -> tuple[Any, jax.Array]:
    """``EMAModel.step`` for an already-incremented ``optimization_step``: returns ``(new_ema_params, decay)``."""
    one_minus = ema_one_minus_decay(
        optimization_step,
        inv_gamma=inv_gamma,
        power=power,
        max_decay=max_decay,
        min_decay=min_decay,
        update_after_step=update_after_step,
        use_warmup=use_warmup,
    )
    return _update(ema_params, params, one_minus), (1.0 - one_minus).astype(jnp.float32)


def init_ema_params(params: Any) -> Any:
    """A float32 copy of the params (diffusers clones the fp32 master params at construction)."""
    return jax.tree_util.tree_map(lambda p: jnp.array(p, dtype=jnp.float32, copy=True), params)


__all__ = ["ema_decay", "ema_one_minus_decay", "ema_update", "ema_step_update", "init_ema_params"]
