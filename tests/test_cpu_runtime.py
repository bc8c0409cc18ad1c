"""cpu_reuse_memory: on one CPU device the train step's scratch memory is reused, not faulted in at every call."""

import sys

import pytest

from test_checkpointing import CHILD_ENV, metrics_at, run_child, train_cmd

# One CPU device (no --xla_force_host_platform_device_count), as `python train_flax.py` runs on a laptop.
ONE_DEVICE_ENV = {**CHILD_ENV, "XLA_FLAGS": ""}
XLA_FLAGS_8_DEVICES = "--xla_force_host_platform_device_count=8"

# A program whose temporary (an outer product, 128 MB) is larger than a glibc thread arena's heap (64 MB): called
# the default way, XLA:CPU maps it afresh and faults in its 32,768 pages at every call.
FAULTS_PER_CALL = """
import resource, sys
import jax, jax.numpy as jnp
from uncond_flax.cpu_runtime import reuse_cpu_memory
applied = reuse_cpu_memory() if sys.argv[1] == "reuse" else False
f = jax.jit(lambda x, y, z: (x[:, None] * y[None, :]) @ z)
x, y, z = jnp.ones(4096), jnp.ones(8192), jnp.ones(8192)
for _ in range(4):  # the heap grows to its size in the first calls
    f(x, y, z).block_until_ready()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x, y, z).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sorted(faults)[2])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_reusing_cpu_memory_stops_the_page_faults_of_each_call():
    results = {}
    for mode in ("default", "reuse"):
        child = run_child([sys.executable, "-c", FAULTS_PER_CALL, mode], env=ONE_DEVICE_ENV)
        assert child.returncode == 0, child.stderr[-3000:]
        applied, faults = child.stdout.split()
        results[mode] = (applied, int(faults))
    assert results["default"][0] == "False" and results["default"][1] > 30_000, results  # the 128 MB, page by page
    assert results["reuse"] == ("True", results["reuse"][1]) and results["reuse"][1] < 100, results


def test_the_trainer_reuses_cpu_memory_on_one_device_and_not_when_told_not_to(tmp_path):
    line = "reuses the memory it frees (cpu_reuse_memory)"
    on = run_child(train_cmd(tmp_path / "on", "--config.max_train_steps=2"), env=ONE_DEVICE_ENV)
    assert on.returncode == 0, on.stderr[-3000:]
    assert line in on.stderr, on.stderr[-3000:]
    off = run_child(
        train_cmd(tmp_path / "off", "--config.max_train_steps=2", "--config.cpu_reuse_memory=false"),
        env=ONE_DEVICE_ENV,
    )
    assert off.returncode == 0, off.stderr[-3000:]
    assert line not in off.stderr
    # The same program either way: the same losses, bit for bit.
    losses = [[row["loss"] for row in metrics_at(tmp_path / d)] for d in ("on", "off")]
    assert losses[0] == losses[1] and len(losses[0]) == 2, losses


def test_several_cpu_devices_keep_the_default_allocator():
    # Programs over several CPU devices run on XLA's threads whatever is set: the allocator is left alone there.
    script = (
        "import jax; from uncond_flax.cpu_runtime import reuse_cpu_memory; applied = reuse_cpu_memory(); "
        "print(jax.local_device_count(), applied)"
    )
    child = run_child([sys.executable, "-c", script], env={**CHILD_ENV, "XLA_FLAGS": XLA_FLAGS_8_DEVICES})
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.split() == ["8", "False"], child.stdout
