"""The train step on a CPU without fresh memory each call (the `cpu_reuse_memory` config field).

XLA:CPU allocates a program's scratch buffer anew at every call and frees it after: one block as large as the
step's temporaries (195 MB for the small benchmark UNet at batch 16, ~900 MB for the default UNet at batch 4). With
async dispatch the call runs on one of XLA's pool threads, whose glibc arena hands out any block above 64 MB by
mmap and returns it by munmap; every step then faults in every page of that block again (47,700 page faults and
~90 ms of kernel time per step for the small UNet on one core; 221,000 and ~0.45 s for the default). Run inline,
on the calling thread, the block comes from the main arena. Told to keep its freed memory (no mmap, no trim), that
arena gives the same block back at the next call, and the faults stop. Measured with `bench/bench_train_step.py`
(README: Benchmarks).

Both settings are process-wide; the trainer's command (`uncond_flax.cli`) applies them, a library caller may.
"""

from __future__ import annotations

import ctypes
import logging
import platform

import jax

logger = logging.getLogger(__name__)

# glibc's mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER = -1  # M_TRIM_THRESHOLD -1: free memory at the heap's top is never given back (mallopt(3)); the largest
# positive value, 2 GiB, would give back a larger scratch block (the default UNet's at batch 16: ~3.4 GB) every step


def run_inline() -> None:
    """CPU programs run on the thread that calls them (JAX's `jax_cpu_enable_async_dispatch=False`). Only takes
    effect when called before JAX starts its CPU backend (the first array, device query or compile)."""
    jax.config.update("jax_cpu_enable_async_dispatch", False)


def keep_freed_memory() -> bool:
    """glibc's main arena keeps what is freed: large blocks come from its heap (never mmap) and freed ones stay for
    the next request (never trimmed). The process's resident memory then stays at its peak. False where the C
    library is not glibc (nothing changed)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER))


def reuse_cpu_memory() -> bool:
    """The trainer's setting for a one-process run: `run_inline()`, then, when the backend is one CPU device,
    `keep_freed_memory()`. Call before JAX's backend starts; True when both took effect. Programs over several CPU
    devices (`--xla_force_host_platform_device_count`) still run on XLA's threads: nothing to gain there."""
    run_inline()
    if jax.default_backend() != "cpu" or jax.local_device_count() != 1 or not keep_freed_memory():
        return False
    logger.info("CPU: the train step runs on this thread and reuses the memory it frees (cpu_reuse_memory)")
    return True
