"""Two real processes joined by jax.distributed (gloo CPU collectives): the same training as one process with
the same devices, and a SIGTERM to one process stops both at the same step through JAX's preemption sync point."""

import os
import signal
import socket
import subprocess
import time

import jax
import numpy as np

from uncond_flax.checkpointing import PREEMPTED_EXIT_CODE

from test_checkpointing import CHILD_ENV, metrics_at, saved_state, train_cmd
from test_train import ROOT

STEPS, EVERY = 24, 12
ARGS = (f"--config.max_train_steps={STEPS}", f"--config.checkpointing_steps={EVERY}")
# 2 CPU devices per process, 4 in all; per-device batch 2 -> global batch 8 either way.
BASE_ENV = {**CHILD_ENV, "XLA_FLAGS": "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_pair(output_dir, *extra):
    port = _free_port()
    return [
        subprocess.Popen(
            train_cmd(
                output_dir,
                *ARGS,
                *extra,
                "--config.distributed=True",
                f"--config.coordinator_address=127.0.0.1:{port}",
                "--config.num_processes=2",
                f"--config.process_id={i}",
            ),
            cwd=ROOT,
            env={**BASE_ENV, "JAX_NUM_CPU_DEVICES": "2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


def test_two_processes_train_like_one_and_stop_together_on_sigterm(tmp_path):
    single = tmp_path / "single"
    subprocess.run(
        train_cmd(single, *ARGS),
        cwd=ROOT,
        env={**BASE_ENV, "JAX_NUM_CPU_DEVICES": "4"},
        check=True,
        capture_output=True,
        timeout=600,
    )

    run = tmp_path / "two"
    procs = _start_pair(run)
    deadline = time.time() + 600
    while len(metrics_at(run)) < EVERY + 2:  # only process 0 writes metrics
        assert time.time() < deadline and all(p.poll() is None for p in procs), procs[0].stdout.read()[-3000:]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # the non-writing process is the one preempted
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [PREEMPTED_EXIT_CODE] * 2, outputs[0][-2000:] + outputs[1][-2000:]
    stopped = {int(out.split("checkpoint at step ")[1].split()[0]) for out in outputs}
    assert len(stopped) == 1, f"processes saved different steps: {stopped}"
    stopped_at = stopped.pop()
    assert EVERY < stopped_at < STEPS

    procs = _start_pair(run, "--config.resume_from_checkpoint=latest")
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert all(f"resumed from checkpoint {stopped_at}" in out for out in outputs)
    assert os.path.isfile(run / "unet" / "diffusion_pytorch_model.safetensors")  # written once, by process 0

    # Same data, noise and steps as the one-process run; only the order of the cross-process gradient
    # reduction differs, so compare to a small fraction of the 24 updates' size (24 * lr = 2.4e-2).
    a, b = saved_state(single, STEPS), saved_state(run, STEPS)
    for key in ("params", "ema_params"):
        leaves_a, leaves_b = jax.tree.leaves(a[key]), jax.tree.leaves(b[key])
        assert len(leaves_a) == len(leaves_b) > 0
        for x, y in zip(leaves_a, leaves_b):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-4)
