"""Finiteness checks and selection over whole pytrees (a non-finite step is skipped, a NaN checkpoint refused)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def all_finite(tree: Any) -> jax.Array:
    """Scalar bool: no inf/nan in any leaf (True for an empty tree)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.array(True)
    # A count over one array, not an `and` of per-leaf scalars: XLA turns that `and` into a chain of scalar ops and
    # copies it into every consumer's fusion (when this fed each parameter's update in the train step: leaves^2
    # instructions, slow to compile and to load from the compilation cache).
    finite_L = jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).astype(jnp.int32)
    return jnp.sum(finite_L) == len(leaves)


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Leafwise ``jnp.where(pred, a, b)`` over two pytrees of the same structure (pred a scalar bool)."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)
