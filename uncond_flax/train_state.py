"""TrainState: everything a training step reads and writes, as one pytree of global arrays."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from uncond_flax.compile_cache import compile_or_load, describe_avals
from uncond_flax.config import COMPUTE_DTYPES
from uncond_flax.ema import init_ema_params
from uncond_flax.export import load_unet
from uncond_flax.loss_scale import make_loss_scale
from uncond_flax.models import FlaxUNet2DModel
from uncond_flax.models.layers import batched_draws
from uncond_flax.parallel import state_shardings
from uncond_flax.rng import rngs_outside_traces


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


def _unet_kwargs(config: Any) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.to_dict().items()}


def build_model(config: Any, dtype=jnp.float32) -> FlaxUNet2DModel:
    """The config's UNet with fresh weights from the seed's `init` stream (compute dtype `dtype`)."""
    return FlaxUNet2DModel(**_unet_kwargs(config), dtype=dtype, rngs=rngs_outside_traces(config.seed, "init"))


def train_state_layout(
    config: Any, mesh: jax.sharding.Mesh, tx: optax.GradientTransformation
) -> tuple[nnx.GraphDef, nnx.GraphDef, TrainState, Any, Callable[..., TrainState]]:
    """(train graphdef, float32 graphdef, abstract TrainState, its shardings on `mesh`, init function).

    Nothing is computed or compiled: a restore needs only this.
    """
    compute_dtype = COMPUTE_DTYPES[config.mixed_precision]
    # Module construction is slow in Python: build each abstract model once (they differ only in dtype). Its fresh
    # weights' keys, computed as it is built, become the init program's argument (`init.weight_key_data`): one
    # program for every seed.
    with batched_draws() as draws:
        abstract_model = nnx.eval_shape(lambda: build_model(config))
    weight_key_data = draws.key_data()
    eval_graphdef, abstract_params, abstract_buffers = nnx.split(abstract_model, nnx.Param, ...)
    if compute_dtype != jnp.float32:
        abstract_model = nnx.eval_shape(lambda: build_model(config, compute_dtype))
    if config.get("gradient_checkpointing", False):  # the train step's model only: sampling computes no gradients
        abstract_model.enable_gradient_checkpointing()
    train_graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
    loss_scale = make_loss_scale(config.mixed_precision)

    def init(params=None, buffers=None, key_data=None):
        """The TrainState of `params` and `buffers`; without them, of fresh weights drawn in batches (the same
        numbers; a program far quicker to compile), from `key_data` (`init.weight_key_data`) where given, else from
        the seed's keys as constants."""
        if params is None:
            with batched_draws() as draws:
                model = build_model(config)
            params, buffers = draws.fill(nnx.split(model, nnx.Param, ...)[1:], key_data)
        return TrainState.create(params, buffers, tx, use_ema=config.use_ema, loss_scale=loss_scale)

    init.weight_key_data = weight_key_data
    # The same shapes as init()'s, without building the model again.
    abstract = jax.eval_shape(init, abstract_params, abstract_buffers)
    return train_graphdef, eval_graphdef, abstract, state_shardings(abstract, mesh), init


def create_train_state(
    config: Any, mesh: jax.sharding.Mesh, tx: optax.GradientTransformation, layout: tuple | None = None
) -> tuple[nnx.GraphDef, nnx.GraphDef, TrainState, Any]:
    """(train graphdef, float32 graphdef, sharded TrainState, its shardings), initialised directly on the mesh
    (random weights, or `init_from`'s). `layout`: `train_state_layout(config, mesh, tx)`, if already made."""
    from uncond_flax.step import step_program_inputs  # here: step imports this module

    train_graphdef, eval_graphdef, abstract, shardings, init = layout or train_state_layout(config, mesh, tx)
    if config.init_from:
        args = tuple(nnx.split(load_unet(config.init_from), nnx.Param, ...)[1:])
    else:  # the weights' keys as an argument: the program is the same for every seed
        args = (None, None, init.weight_key_data)
    options = None
    if jax.default_backend() == "cpu":
        params = sum(leaf.size for leaf in jax.tree.leaves(abstract.params))
        options = {"xla_backend_optimization_level": init_optimization_level(params)}
    # Kept like the train step: a second start loads it untraced (no trace and lowering: ~1.3 s for the default
    # UNet). Its key: the config (as the step's, the seed left out like there; the optimizer's hyperparameters only
    # make more keys), the state it makes, the compile options.
    inputs = step_program_inputs(config, 0) | {"state": describe_avals(abstract)}
    compiled, _, _ = compile_or_load(
        jax.jit(init, out_shardings=shardings),
        args,
        name="init_state",
        shardings=shardings,
        inputs=inputs,
        compiler_options=options,
    )
    return train_graphdef, eval_graphdef, compiled(*args), shardings


# The init program runs once. XLA:CPU compiles its one threefry per parameter leaf fastest at optimisation level 0,
# but runs it there at ~80 ns per parameter; level 1 compiles ~1.5-2 s slower and runs ~4x faster. Measured on one
# core: the digits UNet 5.6 s + 0.1 s at level 0, 7.7 s + 0.0 at level 1; train_unconditional's 113.7 M UNet
# 30.3 + 9.4 s against 31.6 + 2.5 s (the run is paid again at every start: the compile comes from the cache).
# Weights differ between levels by rounding: at most 2^-23 of a leaf's largest weight (digits UNet; FMA). Those
# figures are from one draw per weight; with the draws batched (layers.batched_draws) the default UNet compiles in
# 12.6 s + runs 10.2 s at level 0, 16-21 s + 2.7 s at level 1, so level 1 stays.
INIT_LEVEL_1_FROM_PARAMS = 20_000_000


def init_optimization_level(num_params: int) -> int:
    """XLA:CPU's optimisation level for the init program of a model with `num_params` parameters."""
    return 1 if num_params >= INIT_LEVEL_1_FROM_PARAMS else 0


def inference_model(eval_graphdef: nnx.GraphDef, state: TrainState) -> FlaxUNet2DModel:
    """A float32 model holding the EMA weights (raw weights without EMA), still on the devices."""
    return nnx.merge(eval_graphdef, state.inference_params(), state.buffers)
