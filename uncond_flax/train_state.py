"""TrainState: everything a training step reads and writes, as one pytree of global arrays."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from uncond_flax.ema import init_ema_params


@struct.dataclass
class TrainState:
    """Params, optimizer and EMA state, loss scale and counters. `step` counts optimizer steps attempted.

    `buffers` holds the model's non-trainable weights (e.g. the frozen Fourier projection); `ema_params` is
    None without EMA; `loss_scale` is a `DynamicLossScale` for fp16, else a stateless `NoLossScale`.
    """

    step: jax.Array
    params: nnx.State
    buffers: nnx.State
    opt_state: optax.OptState
    ema_params: nnx.State | None
    ema_step: jax.Array
    loss_scale: Any
    skipped_steps: jax.Array
    consecutive_skips: jax.Array

    @classmethod
    def create(
        cls, params: nnx.State, buffers: nnx.State, tx: optax.GradientTransformation, *, use_ema: bool, loss_scale: Any
    ) -> "TrainState":
        zero = jnp.zeros((), jnp.int32)
        return cls(
            step=zero,
            params=params,
            buffers=buffers,
            opt_state=tx.init(params),
            ema_params=init_ema_params(params) if use_ema else None,
            ema_step=zero,
            loss_scale=loss_scale,
            skipped_steps=zero,
            consecutive_skips=zero,
        )

    def inference_params(self) -> nnx.State:
        """EMA params when tracked, else the raw params: what previews and exports use."""
        return self.ema_params if self.ema_params is not None else self.params
