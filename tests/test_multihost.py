"""Two real processes joined by jax.distributed (gloo CPU collectives), on hosts that share nothing but a bucket:
the same training as one process with the same devices, and a SIGTERM to one process stops both at the same step
through JAX's preemption sync point; both resume from the bucket."""

import os
import socket
import subprocess

import jax
import numpy as np
from safetensors.numpy import load as load_safetensors
from test_checkpointing import CHILD_ENV, run_child, saved_state, train_cmd
from test_storage import _object_bytes
from test_train import ROOT

from uncond_flax.checkpointing import PREEMPTED_EXIT_CODE

STEPS, EVERY = 24, 12
ARGS = (f"--config.max_train_steps={STEPS}", f"--config.checkpointing_steps={EVERY}")
# 2 CPU devices per process, 4 in all; per-device batch 2 -> global batch 8 either way.
BASE_ENV = {**CHILD_ENV, "XLA_FLAGS": "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu"}
TINY_CONFIG = "tests/fixtures/tiny_digits.py"
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pair(
    output_dirs, *overrides, script="train_flax.py", cwds=(ROOT, ROOT), envs=({}, {}), stderr=subprocess.STDOUT
):
    """Processes 0 and 1 of one run (2 CPU devices each) joined through a coordinator on 127.0.0.1; `output_dirs`,
    `cwds` and `envs` (variables added to BASE_ENV) are per process. stdout is piped, stderr goes with it by
    default."""
    port = _free_port()
    procs = []
    for i in range(2):
        cmd = train_cmd(
            output_dirs[i],
            *overrides,
            "--config.distributed=True",
            f"--config.coordinator_address=127.0.0.1:{port}",
            "--config.num_processes=2",
            f"--config.process_id={i}",
            script=script,
        )
        # by absolute path: a process may run in a folder of its own
        cmd = [f"--config={os.path.join(ROOT, TINY_CONFIG)}" if a == f"--config={TINY_CONFIG}" else a for a in cmd]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=cwds[i],
                env={**BASE_ENV, "JAX_NUM_CPU_DEVICES": "2", **envs[i]},
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        )
    return procs


def outputs_of(procs, timeout=600):
    """(stdout, stderr) of each process once all have exited; any still running after `timeout` s is killed (with
    SIGKILL: a SIGTERM only asks JAX's preemption service to stop at the next sync point)."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_two_processes_in_folders_of_their_own_train_like_one_in_a_bucket_and_stop_together_on_sigterm(
    tmp_path, gcs_emulator, gcs_path
):
    single = tmp_path / "single"
    run_child(train_cmd(single, *ARGS), env={**BASE_ENV, "JAX_NUM_CPU_DEVICES": "4"}, check=True)

    # As on hosts that share no disk: each process has a folder of its own as working directory, HOME and TMPDIR;
    # only the bucket is shared.
    homes = [tmp_path / "host0", tmp_path / "host1"]
    for home in homes:
        home.mkdir()
    envs = [{**gcs_emulator.client_env(), "HOME": str(h), "TMPDIR": str(h)} for h in homes]
    run = f"{gcs_path}/run"
    # The non-writing process gets a SIGTERM after step EVERY + 2 (0: never); JAX's preemption sync point stops both.
    preempt = [{"UNCOND_FLAX_SIGTERM_AT_STEP": str(step)} for step in (0, EVERY + 2)]
    procs = start_pair(
        (run, run),
        *ARGS,
        script="tests/fixtures/sigterm_at_step.py",
        cwds=homes,
        envs=[{**env, **extra} for env, extra in zip(envs, preempt)],
    )
    outputs = [out for out, _ in outputs_of(procs)]
    assert [p.returncode for p in procs] == [PREEMPTED_EXIT_CODE] * 2, outputs[0][-2000:] + outputs[1][-2000:]
    stopped = {int(out.split("checkpoint at step ")[1].split()[0]) for out in outputs}
    assert len(stopped) == 1, f"processes saved different steps: {stopped}"
    stopped_at = stopped.pop()
    assert EVERY < stopped_at < STEPS

    procs = start_pair((run, run), *ARGS, "--config.resume_from_checkpoint=latest", cwds=homes, envs=envs)
    outputs = [out for out, _ in outputs_of(procs)]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert all(f"resumed from checkpoint {stopped_at} in {run}/checkpoints" in out for out in outputs)
    for home in homes:  # nothing meant for the bucket stayed in a process's own folder (a URL taken for a path)
        assert sorted(os.listdir(home)) == [], os.listdir(home)

    # Same data, noise and steps as the one-process run; only the order of the cross-process gradient
    # reduction differs, so compare to a small fraction of the 24 updates' size (24 * lr = 2.4e-2).
    a, b = saved_state(single, STEPS), saved_state(run, STEPS)
    for key in ("params", "ema_params"):
        leaves_a, leaves_b = jax.tree.leaves(a[key]), jax.tree.leaves(b[key])
        assert len(leaves_a) == len(leaves_b) > 0
        for x, y in zip(leaves_a, leaves_b):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-4)
    # and the pipeline process 0 exported into the bucket holds those EMA weights
    expected = load_safetensors((single / WEIGHTS).read_bytes())
    exported = load_safetensors(_object_bytes(gcs_emulator, f"{run}/{WEIGHTS}"))
    assert exported.keys() == expected.keys() and expected
    for name, value in expected.items():
        np.testing.assert_allclose(exported[name], value, rtol=0, atol=1e-4, err_msg=name)
