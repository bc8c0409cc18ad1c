"""One random stream per purpose, all derived from the config's `seed`, none sharing a key with another.

`jax.random.key(seed)` itself is never used directly: folding in a distinct tag first keeps, for example, the
preview noise independent of the initial weights and of the first step's noise. (The data order and crop/flip
draws use numpy generators seeded from (seed, epoch, index): a different generator, see `uncond_flax.data.steps`.)
"""

from __future__ import annotations

import jax
from flax import nnx

# Fixed forever: changing a tag changes every run's numbers.
PURPOSES = {"init": 1, "step": 2, "preview": 3}


def purpose_key(seed: int, purpose: str) -> jax.Array:
    """The root key of one purpose's stream."""
    return jax.random.fold_in(jax.random.key(seed), PURPOSES[purpose])


def step_keys(seed: int | jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(noise, timesteps, dropout) keys of one optimizer step: a function of (seed, step) alone, so a resumed run
    draws what the uninterrupted run drew. `seed`: the int, or `step_stream_data(seed)` (the train step takes it as
    an argument, so that one compiled step serves every seed)."""
    root = purpose_key(seed, "step") if isinstance(seed, int) else jax.random.wrap_key_data(seed)
    k_noise, k_time, k_drop = jax.random.split(jax.random.fold_in(root, step), 3)
    return k_noise, k_time, k_drop


def step_stream_data(seed: int) -> jax.Array:
    """The raw data (uint32) of the seed's `step` stream key: what `step_keys` takes in place of the seed."""
    with jax.ensure_compile_time_eval():
        return jax.random.key_data(purpose_key(seed, "step"))


class _CountOutsideTraces(nnx.RngStream):
    """An RngStream whose draw count is computed as Python runs, never staged into a trace (nor are its keys, when
    its key is not traced).

    Created inside a trace (`eval_shape`, the jitted init, the train step), a plain stream's count becomes a tracer,
    and every draw after the first asks it for `.sharding` (flax's Variable update): on a tracer, JAX answers with an
    error whose message walks the whole program traced so far. The default UNet's ~900 weight draws took 8 of the 10
    CPU-s of `train_state_layout` that way, and ~14 s of `create_train_state`, at every start; with dropout 0.1,
    tracing its train step took 7.4 CPU-s, 4.9 with this stream (4.7 without dropout). The keys drawn are the same.
    """

    def __call__(self) -> jax.Array:
        with jax.ensure_compile_time_eval():
            return super().__call__()


def rngs_outside_traces(seed: int | jax.Array, purpose: str | None = None, *, stream: str = "default") -> nnx.Rngs:
    """`nnx.Rngs(**{stream: key})` drawing the same keys, with its count kept out of traces (`_CountOutsideTraces`).

    `seed`: a key, or an int: `purpose_key(seed, purpose)`, or `jax.random.key(seed)` without a purpose, computed
    outside any trace too.
    """
    with jax.ensure_compile_time_eval():
        key = seed
        if isinstance(seed, int):
            key = jax.random.key(seed) if purpose is None else purpose_key(seed, purpose)
        rngs = nnx.Rngs()
        setattr(rngs, stream, _CountOutsideTraces(key, tag=stream))
    return rngs
