"""Test session setup: 8 simulated CPU devices, a persistent JAX compilation cache, offline hub."""

import os
import tempfile

# Must happen before jax is imported anywhere in the test session: 8 simulated CPU devices, and LLVM
# optimisations off, which cuts XLA:CPU compile time (most of this suite's time) by about a quarter.
TEST_XLA_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
_flags = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join(
    _flags + [f for f in TEST_XLA_FLAGS if f.split("=")[0] not in {g.split("=")[0] for g in _flags}]
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

_CACHE_DIR = os.environ.get("UNCOND_FLAX_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "uncond_flax_jax_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# grain's multiprocessing prefetch reads absl flags; outside absl.app.run they must be marked parsed.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
