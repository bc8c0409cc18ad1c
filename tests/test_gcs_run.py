"""A whole run with output_dir in gs:// (fake-gcs-server on 127.0.0.1): stopped by SIGTERM, killed -9 while a
checkpoint commits, resumed from the bucket each time, and ending with the same exported pipeline as the same run
on a local disk."""

import json
import os
import subprocess

from test_checkpointing import CHILD_ENV, run_child, train_cmd
from test_storage import _object_bytes, _objects
from test_train import ROOT

from uncond_flax import storage

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
PREVIEW = "samples/epoch_0000.png"  # the last epoch's, made whatever save_images_epochs says


def _steps(emulator, url: str) -> list[int]:
    return [json.loads(line)["step"] for line in _object_bytes(emulator, url).splitlines()]


def test_a_run_in_a_bucket_preempted_killed_and_resumed_exports_what_a_local_run_does(tmp_path, gcs_emulator, gcs_path):
    from diffusers import DDPMPipeline

    args = ("--config.max_train_steps=12", "--config.checkpointing_steps=4", "--config.save_model_epochs=1")
    local = tmp_path / "local"
    run_child(train_cmd(local, *args), check=True)

    run, metrics = f"{gcs_path}/run", f"{gcs_path}/run/logs/metrics.jsonl"
    # The emulator's variables (CHILD_ENV was taken before the fixture set them), and a private TMPDIR: what a run
    # in a bucket stages locally (its log folder) must be copied up and gone by the time it exits.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**CHILD_ENV, **gcs_emulator.client_env(), "TMPDIR": str(scratch)}

    # 1. SIGTERM after step 6: a checkpoint there, exit 75, the logs in the bucket.
    stopped = run_child(
        train_cmd(run, *args, script="tests/fixtures/sigterm_at_step.py"),
        env={**env, "UNCOND_FLAX_SIGTERM_AT_STEP": "6"},
    )
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert f"checkpoint at step 6 saved in {run}/checkpoints" in stopped.stderr
    assert os.listdir(scratch) == []
    assert _steps(gcs_emulator, metrics) == [1, 2, 3, 4, 5, 6]

    # 2. Resume, and kill -9 while checkpoint 12 commits (8 is committed): the bucket holds the metrics of every step
    # up to the checkpoint being saved, so the next resume (from 8) leaves no gap in them.
    killed = subprocess.Popen(
        train_cmd(run, *args, "--config.resume_from_checkpoint=latest", script="tests/fixtures/slow_save_train.py"),
        cwd=ROOT,
        env={**env, "TMPDIR": str(tmp_path), "UNCOND_FLAX_SLOW_SAVE_STEP": "12"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = ""
    while "COMMITTING 12" not in line:
        line = killed.stdout.readline()
        assert line or killed.poll() is None, "the run ended before committing step 12"
    killed.kill()
    killed.wait()
    assert _steps(gcs_emulator, metrics) == list(range(1, 13))

    # 3. Resume from the last committed checkpoint, to the end.
    resumed = run_child(train_cmd(run, *args, "--config.resume_from_checkpoint=latest"), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoint 8 in {run}/checkpoints" in resumed.stderr
    assert os.listdir(scratch) == []
    assert not os.path.exists(os.path.join(ROOT, "gs:"))  # no URL taken for a relative local path
    assert _steps(gcs_emulator, metrics) == list(range(1, 13))

    objects = _objects(gcs_emulator, run)
    assert {name.split("/")[1] for name in objects if name.startswith("checkpoints/")} >= {"4", "6", "8", "12"}
    # the whole exported pipeline, weights included, and the preview grid are byte-identical to the local run's
    for name in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json", WEIGHTS, PREVIEW):
        assert _object_bytes(gcs_emulator, f"{run}/{name}") == (local / name).read_bytes(), name

    with storage.local_copy(run, exclude=("checkpoints", "logs", "samples")) as folder:
        pipe = DDPMPipeline.from_pretrained(folder)
    expected = DDPMPipeline.from_pretrained(str(local)).unet.state_dict()
    loaded = pipe.unet.state_dict()
    assert loaded.keys() == expected.keys()
    for name, value in expected.items():
        assert loaded[name].equal(value), name
