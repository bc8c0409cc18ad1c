"""XLA compiler options the trainer and sampler compile with, per backend.

On CPU, XLA (jaxlib 0.10) hands convolutions to YNNPACK by default, whose backward convolutions run 2-3x
slower than XLA's own (Eigen) ones at this UNet's shapes (bench/bench_layers.py); matmuls stay with YNNPACK.
Passed per jit (`jax.jit(..., compiler_options=compiler_options())`) rather than through XLA_FLAGS, so an
XLA that no longer knows the option costs nothing: it is probed once and dropped.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

logger = logging.getLogger(__name__)

# Library fusions XLA:CPU may use: YNNPACK for matmuls only (not convolutions).
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def _accepted(options: tuple[tuple[str, str], ...]) -> bool:
    try:
        jax.jit(jnp.negative).lower(jnp.zeros(2)).compile(compiler_options=dict(options))
    except Exception as error:  # noqa: BLE001  (XLA reports an unknown option or value as a generic runtime error)
        logger.info("XLA does not take %s (%s); compiling with its defaults", dict(options), error)
        return False
    return True


def compiler_options() -> dict[str, str]:
    """The options to compile with on JAX's default backend; {} where none help."""
    if jax.default_backend() != "cpu" or not _accepted(tuple(CPU_OPTIONS.items())):
        return {}
    return dict(CPU_OPTIONS)
