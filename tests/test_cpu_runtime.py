"""cpu_reuse_memory: on one CPU device the train step's scratch memory is reused, not faulted in at every call."""

import sys

import pytest

from test_checkpointing import CHILD_ENV, metrics_at, run_child, train_cmd

# One CPU device (no --xla_force_host_platform_device_count), as `python train_flax.py` runs on a laptop.
ONE_DEVICE_ENV = {**CHILD_ENV, "XLA_FLAGS": ""}
XLA_FLAGS_8_DEVICES = "--xla_force_host_platform_device_count=8"

# A program whose result (an outer product, 128 MB) is larger than a glibc thread arena's heap (64 MB), dropped after
# each call: called the default way, XLA:CPU maps the block afresh and faults in its 32,768 pages at every call. One
# loop fusion and nothing else, so that the block is the call's result buffer, which XLA allocates itself on the
# calling thread. With a product (`@`) after it, one CI machine faulted the block in at every call even with reuse,
# which no machine here reproduced: the product is free to go to a library (YNNPACK, oneDNN) that may hold the
# block itself, per CPU.
FAULTS_PER_CALL = """
import ctypes, resource, sys
import jax, jax.numpy as jnp
from uncond_flax.cpu_runtime import reuse_cpu_memory
applied = reuse_cpu_memory() if sys.argv[1] == "reuse" else False
f = jax.jit(lambda x, y: x[:, None] * y[None, :])
x, y = jnp.ones(4096), jnp.ones(8192)
for _ in range(4):  # the heap grows to its size in the first calls
    f(x, y).block_until_ready()
faults, inline = [], []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = f(x, y)
    inline.append(out.is_ready())  # run on this thread: done when the call returns
    out.block_until_ready()
    del out
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sorted(faults)[2], all(inline))
ctypes.CDLL(None).malloc_stats()  # to stderr, for the assertion's message: the arenas, and the largest mmap total
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_reusing_cpu_memory_stops_the_page_faults_of_each_call():
    results, stderr = {}, {}
    for mode in ("default", "reuse"):
        child = run_child([sys.executable, "-c", FAULTS_PER_CALL, mode], env=ONE_DEVICE_ENV)
        assert child.returncode == 0, child.stderr[-3000:]
        applied, faults, inline = child.stdout.split()
        results[mode], stderr[mode] = (applied, int(faults), inline), child.stderr[-1500:]
    assert results["default"][0] == "False" and results["default"][1] > 30_000, (results, stderr)  # page by page
    assert results["reuse"][0] == "True" and results["reuse"][2] == "True", (results, stderr)  # on this thread
    assert results["reuse"][1] < 100, (results, stderr)


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
