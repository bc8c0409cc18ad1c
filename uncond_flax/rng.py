"""One random stream per purpose, all derived from the config's `seed`, none sharing a key with another.

`jax.random.key(seed)` itself is never used directly: folding in a distinct tag first keeps, for example, the
preview noise independent of the initial weights and of the first step's noise. (The data order and crop/flip
draws use numpy generators seeded from (seed, epoch, index): a different generator, see `uncond_flax.data.steps`.)
"""

from __future__ import annotations

import jax

# Fixed forever: changing a tag changes every run's numbers.
PURPOSES = {"init": 1, "step": 2, "preview": 3}


def purpose_key(seed: int, purpose: str) -> jax.Array:
    """The root key of one purpose's stream."""
    return jax.random.fold_in(jax.random.key(seed), PURPOSES[purpose])


def step_keys(seed: int, step: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(noise, timesteps, dropout) keys of one optimizer step: a function of (seed, step) alone, so a resumed run
    draws what the uninterrupted run drew."""
    k_noise, k_time, k_drop = jax.random.split(jax.random.fold_in(purpose_key(seed, "step"), step), 3)
    return k_noise, k_time, k_drop
