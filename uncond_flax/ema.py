"""diffusers' ``EMAModel`` (as train_unconditional.py builds it) as pure, jittable functions.

Calling convention, reproducing ``ema_model.step(model.parameters())``. Keep an int32 counter ``ema_step`` that
starts at 0 (diffusers' ``optimization_step``) and the EMA params, initialised as a float32 copy of the initial
params. Once per optimizer update (every ``accelerator.sync_gradients`` step), after the params were updated::

    ema_step = ema_step + 1                              # diffusers increments first ...
    ema_params, decay = EmaSchedule(inv_gamma=..., power=..., max_decay=...).update(ema_params, params, ema_step)
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

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class EmaSchedule:
    """diffusers' ``EMAModel`` decay options, with its defaults (the script sets the first three from its flags)."""

    inv_gamma: float = 1.0
    power: float = 0.75
    max_decay: float = 0.9999
    min_decay: float = 0.0
    update_after_step: int = 0
    use_warmup: bool = True

    @classmethod
    def from_config(cls, config: Any) -> EmaSchedule:
        """What train_unconditional.py passes: ``--ema_inv_gamma``, ``--ema_power``, ``--ema_max_decay``."""
        return cls(inv_gamma=config.ema_inv_gamma, power=config.ema_power, max_decay=config.ema_max_decay)

    def one_minus_decay(self, optimization_step: jax.Array) -> jax.Array:
        """``1 - decay`` in float32, computed directly so it keeps full relative precision as decay -> 1."""
        step = jnp.maximum(0, jnp.asarray(optimization_step, jnp.int32) - self.update_after_step - 1)
        stepf = step.astype(jnp.float32)
        if self.use_warmup:
            one_minus = (1.0 + stepf / self.inv_gamma) ** (-float(self.power))
        else:
            one_minus = 9.0 / (10.0 + stepf)  # 1 - (1 + step) / (10 + step)
        # min(decay, max_decay) then max(decay, min_decay), in 1 - decay terms; 1 - max_decay is taken in float64.
        one_minus = jnp.maximum(one_minus, 1.0 - float(self.max_decay))
        one_minus = jnp.minimum(one_minus, 1.0 - float(self.min_decay))
        # diffusers returns decay 0 for step <= 0 before clamping (so min_decay does not apply there).
        return jnp.where(step <= 0, 1.0, one_minus).astype(jnp.float32)

    def decay(self, optimization_step: jax.Array) -> jax.Array:
        """``EMAModel.get_decay(optimization_step)`` in float32 (step is 1-based: already incremented)."""
        return (1.0 - self.one_minus_decay(optimization_step)).astype(jnp.float32)

    def update(self, ema_params: Any, params: Any, optimization_step: jax.Array) -> tuple[Any, jax.Array]:
        """``EMAModel.step`` for an already-incremented step: ``(new_ema_params, decay)``."""
        one_minus = self.one_minus_decay(optimization_step)
        return _update(ema_params, params, one_minus), (1.0 - one_minus).astype(jnp.float32)


def _update(ema_params: Any, params: Any, one_minus_decay: jax.Array) -> Any:
    def leaf(e: jax.Array, p: jax.Array) -> jax.Array:
        # Same operation order as diffusers: s - (1 - decay) * (s - p), in the EMA leaf's dtype.
        return e - one_minus_decay.astype(e.dtype) * (e - p.astype(e.dtype))

    return jax.tree_util.tree_map(leaf, ema_params, params)


def ema_one_minus_decay(optimization_step: jax.Array, **schedule: Any) -> jax.Array:
    """``1 - ema_decay(...)``; keyword arguments are ``EmaSchedule``'s fields."""
    return EmaSchedule(**schedule).one_minus_decay(optimization_step)


def ema_decay(optimization_step: jax.Array, **schedule: Any) -> jax.Array:
    """diffusers' ``EMAModel.get_decay``; keyword arguments are ``EmaSchedule``'s fields."""
    return EmaSchedule(**schedule).decay(optimization_step)


def ema_step_update(
    ema_params: Any, params: Any, optimization_step: jax.Array, **schedule: Any
) -> tuple[Any, jax.Array]:
    """``EMAModel.step``: ``(new_ema_params, decay)``; keyword arguments are ``EmaSchedule``'s fields."""
    return EmaSchedule(**schedule).update(ema_params, params, optimization_step)


def ema_update(ema_params: Any, params: Any, decay: jax.Array) -> Any:
    """One EMA step per leaf: ``ema - (1 - decay) * (ema - param)`` in the EMA leaf's dtype."""
    return _update(ema_params, params, 1.0 - jnp.asarray(decay, jnp.float32))


def init_ema_params(params: Any) -> Any:
    """A float32 copy of the params (diffusers clones the fp32 master params at construction)."""
    return jax.tree_util.tree_map(lambda p: jnp.array(p, dtype=jnp.float32, copy=True), params)


__all__ = ["EmaSchedule", "ema_decay", "ema_one_minus_decay", "ema_update", "ema_step_update", "init_ema_params"]
