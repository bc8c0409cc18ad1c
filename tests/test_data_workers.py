"""The loader's worker processes die with the training process, even when it is killed with SIGKILL."""

import os
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# A training process in miniature: a loader with 2 grain workers (or the decode cache's pool) that has produced
# a batch, then waits to be killed.
_CHILD = """
import sys, time
from fixtures.data_factory import data_config
from uncond_flax.data import build_train_loader
from uncond_flax.parallel import make_mesh

kind = sys.argv[1]
if kind == "loader":
    loader = build_train_loader(data_config(dataset_name="digits", dataloader_num_workers=2), make_mesh())
    next(loader)
    print("ready", flush=True)
else:  # the decode cache's process pool, killed while its workers are busy decoding
    import uncond_flax.data.decode_cache as decode_cache
    from uncond_flax.data.sources import DigitsSource

    chunks = decode_cache._run_chunks(DigitsSource(), [(i, i + 1) for i in range(1797)], 2048, "RGB", 2)
    next(chunks)
    print("ready", flush=True)
    for _ in chunks:
        pass
time.sleep(600)
"""


def _children() -> dict[int, int]:
    """pid -> parent pid of every process, from /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z":  # a zombie has exited; only its parent has not collected it yet
                out[int(name)] = int(fields[1])
    return out


def _descendants(pid: int) -> set[int]:
    parents = _children()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc")
@pytest.mark.parametrize("kind", ["loader", "decode_cache"])
def test_workers_exit_after_the_trainer_is_killed(kind):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT]), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, kind], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        workers = _descendants(child.pid)
        assert len(workers) >= 2  # the two workers (and the resource tracker, if one was started)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 10
    while (alive := workers & set(_children())) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive:  # don't leave them behind for the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"{len(alive)} of the killed process's {len(workers)} children still run"


def test_workers_import_no_jax():
    # grain's workers unpickle the StepReader, importing uncond_flax.data: with JAX that is seconds and ~200 MB
    # more per worker. The package imports JAX only inside the functions that put batches on devices.
    code = "import sys, uncond_flax.data; print(sorted(m for m in ('jax', 'jaxlib', 'flax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
