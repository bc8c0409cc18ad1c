"""JAX's persistent compilation cache, on by default, with a log line whenever a program comes from it.

A second start of the same run (a resume, or the same command again) then loads its compiled train step and
sampler from disk instead of compiling them. The default location is the user's cache directory, never
`output_dir`: outputs may live on `gs://` and be shared, and a compilation cache must stay trusted.
"""

from __future__ import annotations

import logging
import os

import jax
from jax import monitoring

logger = logging.getLogger(__name__)

AUTO = "auto"
_HIT_EVENT = "/jax/compilation_cache/compile_time_saved_sec"
_listening = False


def default_cache_dir() -> str:
    """`$XDG_CACHE_HOME/uncond_flax/jax`, or `~/.cache/uncond_flax/jax`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "uncond_flax", "jax")


def _log_hit(event: str, duration_secs: float, **_: object) -> None:
    # JAX records this once per program read from the persistent cache (and never on a miss).
    if event == _HIT_EVENT:
        logger.info(
            "compiled program loaded from the persistent compilation cache in %s (%.1fs of compiling saved)",
            jax.config.jax_compilation_cache_dir,
            duration_secs,
        )


def enable_compile_cache(value: str | None = AUTO) -> str | None:
    """Turn on the persistent compilation cache (the `compilation_cache_dir` config field); returns its directory.

    "auto": the directory JAX already has (JAX_COMPILATION_CACHE_DIR), else `default_cache_dir()`; a path or
    `gs://` URL: that; None or "": leave JAX's own setting alone (off unless JAX_COMPILATION_CACHE_DIR is set).
    Call it before the first compile. Cache hits are logged at INFO by this module's logger; a directory that
    cannot be created is a warning, and the run goes on without the cache.
    """
    global _listening
    if not value:
        return jax.config.jax_compilation_cache_dir
    path = (jax.config.jax_compilation_cache_dir or default_cache_dir()) if value == AUTO else value
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:  # a read-only home must not stop a run: the cache only saves time
            logger.warning("compilation cache off: cannot create %s (%s); set compilation_cache_dir", path, e)
            return None
    jax.config.update("jax_compilation_cache_dir", path)
    if not _listening:
        monitoring.register_event_duration_secs_listener(_log_hit)
        _listening = True
    logger.info("persistent compilation cache: %s", path)
    return path
