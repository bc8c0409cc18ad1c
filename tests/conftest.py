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
# gcsfs checks this at import: no gRPC bucket-type probe, which the GCS emulator cannot answer (tests/gcs_emulator.py)
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import jax  # noqa: E402

_CACHE_DIR = os.environ.get("UNCOND_FLAX_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "uncond_flax_jax_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# grain's multiprocessing prefetch reads absl flags; outside absl.app.run they must be marked parsed.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


# --------------------------------------------------------------------------------------------------------------
# gs:// through a real GCS-protocol server on 127.0.0.1 (see tests/gcs_emulator.py)

import uuid  # noqa: E402

import pytest  # noqa: E402

GCS_TEST_BUCKET = "bkt"


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """fake-gcs-server with bucket `bkt`; this process (and its children) reach it through the standard client
    variables only, set for the session and restored after."""
    from gcs_emulator import GCSEmulator

    emulator = GCSEmulator(tmp_path_factory.mktemp("gcs")).start()
    saved = {k: os.environ.get(k) for k in emulator.client_env()}
    os.environ.update(emulator.client_env())
    try:
        emulator.create_bucket(GCS_TEST_BUCKET)
        yield emulator
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        emulator.stop()


@pytest.fixture
def gcs_path(gcs_emulator) -> str:
    """A fresh, empty `gs://bkt/<random>` folder in the emulator."""
    return f"gs://{GCS_TEST_BUCKET}/{uuid.uuid4().hex[:12]}"
