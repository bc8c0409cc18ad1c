"""A run's outputs survive interruptions whole: epoch-end work after a resume, a repaired metrics file, a full
disk, no secret written anywhere, one random stream per purpose."""

import errno
import json
import os
import shutil
import subprocess
import time

import jax
import numpy as np
import pytest
from flax import nnx
from test_checkpointing import CHILD_ENV, metrics_at, run_child, train_cmd
from test_train import tiny_config

from uncond_flax.config import ConfigError, resolve_config
from uncond_flax.rng import PURPOSES, purpose_key, step_keys
from uncond_flax.run_lock import LOCK_NAME
from uncond_flax.train import train_and_evaluate
from uncond_flax.train_state import build_model


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_a_preemption_on_an_epochs_last_step_still_does_its_end_work_after_resume(tmp_path):
    # 1,797 digits in global batches of 256 (32 on each of 8 devices): 7 steps an epoch, two epochs. The preemption
    # lands on step 7, the last of epoch 0, before its preview grid and export.
    args = (
        "--config.train_batch_size=32",
        "--config.max_train_steps=14",
        "--config.save_model_epochs=1",
        "--config.save_images_epochs=1",
    )
    straight = tmp_path / "straight"
    # The runtime needs no torch: a whole run (steps, checkpoints, previews, export) imports neither torch nor
    # diffusers, both installed here (tensorboardX imports torch wherever it can).
    done = run_child(train_cmd(straight, *args), env={**CHILD_ENV, "PYTHONPROFILEIMPORTTIME": "1"}, check=True)
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    # A refused `import torch` is listed too, alone: torch's own modules (torch._C, ...) come only with the real one.
    assert "tensorboardX" in imported and not [m for m in imported if m.startswith(("torch.", "diffusers"))]

    run = tmp_path / "interrupted"
    stopped = run_child(
        train_cmd(run, *args, script="tests/fixtures/sigterm_at_step.py"),
        env={**CHILD_ENV, "UNCOND_FLAX_SIGTERM_AT_STEP": "7"},
    )
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert "checkpoint at step 7" in stopped.stderr
    assert not (run / "unet").exists() and not (run / "samples").exists()

    run_child(train_cmd(run, *args, "--config.resume_from_checkpoint=latest"), check=True)
    names = ("unet/diffusion_pytorch_model.safetensors", "samples/epoch_0000.png", "samples/epoch_0001.png")
    for name in names:
        assert (run / name).read_bytes() == (straight / name).read_bytes(), name


def test_the_last_epoch_always_gets_its_grid_and_an_export_of_the_final_weights(tmp_path):
    # 7 steps an epoch (global batch 256), 9 steps: epoch 1 is the last and partial; neither interval reaches it.
    config = tiny_config(
        tmp_path, train_batch_size=32, max_train_steps=9, use_ema=True, save_images_epochs=1000, save_model_epochs=1000
    )
    state = train_and_evaluate(config)
    assert _files(os.path.join(config.output_dir, "samples")) == ["epoch_0000.png", "epoch_0001.png"]
    from safetensors.numpy import load_file

    exported = load_file(os.path.join(config.output_dir, "unet", "diffusion_pytorch_model.safetensors"))
    final = np.asarray(state.ema_params["conv_out"]["kernel"][...]).transpose(3, 2, 0, 1)
    np.testing.assert_array_equal(exported["conv_out.weight"], final)


def test_resume_repairs_a_torn_metrics_file_and_replays_no_step(tmp_path):
    common = dict(max_train_steps=6, checkpointing_steps=3, save_images_epochs=1000, save_model_epochs=1000)
    config = tiny_config(tmp_path, **common)
    train_and_evaluate(config)
    first = metrics_at(config.output_dir)
    path = os.path.join(config.output_dir, "logs", "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"step": 7, "loss": 0.12')  # a crash (or a full disk) in the middle of a line

    train_and_evaluate(tiny_config(tmp_path, resume_from_checkpoint="3", **common))
    with open(path) as f:
        lines = [json.loads(line) for line in f]  # every line parses
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in lines] == [m["loss"] for m in first]  # steps 4-6 replayed to the same values


def _mount_tmpfs(path, size):
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if result.returncode:
        pytest.skip(f"needs a small filesystem to fill (mount -t tmpfs as root): {result.stderr.decode().strip()}")


def test_a_full_disk_stops_with_one_line_and_resume_continues_cleanly(tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "16m")
    try:
        run = disk / "run"
        args = ("--config.max_train_steps=40", "--config.checkpointing_steps=4", "--config.log_every=1")
        # Leave room for about two checkpoints (~0.8 MB each for this model with EMA), then the disk is full.
        (disk / "filler").write_bytes(b"\0" * (14 * 2**20))
        full = run_child(train_cmd(run, *args))
        assert full.returncode == 1, full.stderr[-3000:]
        last = full.stderr.strip().splitlines()[-1]
        assert last.startswith("train_flax.py: error: no space left on the device while writing "), last
        assert last.endswith(
            "free space, then resume with --config.resume_from_checkpoint=latest (the checkpoints before it are intact)"
        ), last
        assert "Traceback" not in full.stderr
        saved = sorted(int(s) for s in os.listdir(run / "checkpoints") if s.isdigit())
        assert saved, "the run should have saved a checkpoint before the disk filled"

        (disk / "filler").unlink()
        run_child(train_cmd(run, *args, "--config.resume_from_checkpoint=latest"), check=True)
        with open(run / "logs" / "metrics.jsonl") as f:
            steps = [json.loads(line)["step"] for line in f]
        assert steps == list(range(1, 41))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_while_logging_names_the_metrics_file(tmp_path):
    # A write through an open file names no file by itself; the trainer's one-line message needs the path.
    from uncond_flax.metrics import METRICS_FILE, MetricWriter

    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "64k")
    writer = MetricWriter("tensorboard", str(disk / "logs"), {})
    try:
        with pytest.raises(OSError) as error:
            with open(disk / "filler", "wb") as filler:
                while True:
                    filler.write(b"\0" * 4096)
                    filler.flush()
        assert error.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as error:
            for step in range(1, 10_000):
                writer.scalars(step, {"loss": 0.5})
            writer.flush()
        assert error.value.errno == errno.ENOSPC
        assert error.value.filename == str(disk / "logs" / METRICS_FILE)
    finally:
        (disk / "filler").unlink(missing_ok=True)  # room for tensorboard's last flush, then nothing holds the disk
        writer.close()
        subprocess.run(["umount", str(disk)], check=False)


FAKE_TOKEN = "hf_uncondFlaxFakeTokenDoNotStore0123456789"


def test_the_hub_token_is_used_but_never_written(tmp_path, monkeypatch, caplog):
    from huggingface_hub import HfApi

    used_tokens = []

    class _Repo:
        repo_id = "me/ddpm-digits"

    def create_repo(self, repo_id, **kwargs):
        used_tokens.append(self.token)
        return _Repo()

    def upload_folder(self, **kwargs):
        used_tokens.append(self.token)
        raise OSError(f"403 Forbidden for token {self.token}")  # an error that quotes the token

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    # wandb, offline: diffusers' script hands it the whole config, token included, which is how it once leaked.
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny_config(
        tmp_path,
        logger="wandb",
        max_train_steps=4,
        checkpointing_steps=2,
        push_to_hub=True,
        hub_token=FAKE_TOKEN,
        hub_model_id="me/ddpm-digits",
        save_model_epochs=1,
        save_images_epochs=1,
    )
    from uncond_flax.train import TrainingError

    with caplog.at_level("INFO"), pytest.raises(TrainingError, match="push_to_hub") as failure:
        train_and_evaluate(config)
    assert used_tokens and set(used_tokens) == {FAKE_TOKEN}
    assert FAKE_TOKEN not in str(failure.value) and FAKE_TOKEN not in caplog.text
    assert "403 Forbidden" in caplog.text  # the upload error itself is reported, redacted
    out = config.output_dir
    files = _files(out)
    assert {"unet/diffusion_pytorch_model.safetensors", "README.md", "logs/metrics.jsonl"} <= set(files)
    assert any(f.startswith("checkpoints/4/") for f in files)
    # The wandb run (offline: one protobuf record log) got the config, the metrics and the grids, without the token.
    # wandb's service process writes that log on its own: `finish()` has returned with only the file's header
    # written (once, on a loaded 2-core CI machine), the records following it. So wait for them (up to 30 s), then
    # read every file for the token.
    (record_log,) = [f for f in files if f.startswith("logs/wandb/offline-run-") and f.endswith(".wandb")]
    keys = (b"learning_rate", b"hub_model_id", b"grad_norm", b"skipped_steps", b"test_samples")
    deadline = time.monotonic() + 30
    while True:
        with open(os.path.join(out, record_log), "rb") as f:
            records = f.read()
        if all(key in records for key in keys) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for key in keys:
        assert key in records, key
    for name in _files(out):
        with open(os.path.join(out, name), "rb") as f:
            assert FAKE_TOKEN.encode() not in f.read(), name


def test_a_hub_repo_that_cannot_be_created_stops_before_training_without_the_token(tmp_path, monkeypatch, caplog):
    from huggingface_hub import HfApi

    def create_repo(self, repo_id, **kwargs):
        raise OSError(f"401 Unauthorized: bad token {self.token}\nfor {repo_id}")  # an error that quotes the token

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    config = tiny_config(
        tmp_path, max_train_steps=2, push_to_hub=True, hub_token=FAKE_TOKEN, hub_model_id="me/ddpm-digits"
    )
    with caplog.at_level("INFO"), pytest.raises(ConfigError) as failure:
        train_and_evaluate(config)
    assert str(failure.value) == (
        "push_to_hub: cannot create or reach 'me/ddpm-digits': 401 Unauthorized: bad token *** for me/ddpm-digits"
    )
    assert FAKE_TOKEN not in caplog.text
    assert not os.path.exists(os.path.join(config.output_dir, "checkpoints", LOCK_NAME))  # released for a retry


def test_each_purpose_has_its_own_random_stream(tmp_path):
    seed = 0
    keys = {f"{p}": purpose_key(seed, p) for p in PURPOSES}
    for step in range(4):
        for name, key in zip(("noise", "time", "dropout"), step_keys(seed, step), strict=True):
            keys[f"step{step}/{name}"] = key
    keys["root"] = jax.random.key(seed)
    datas = {name: tuple(np.asarray(jax.random.key_data(k)).tolist()) for name, k in keys.items()}
    assert len(set(datas.values())) == len(datas), datas

    # The trainer's model init draws from the init stream, not from key(seed) (which a preview once shared).
    config = resolve_config(tiny_config(tmp_path))
    ours = nnx.state(build_model(config), nnx.Param)["conv_in"]["kernel"][...]
    from uncond_flax.models import FlaxUNet2DModel
    from uncond_flax.train_state import _unet_kwargs

    from_root = FlaxUNet2DModel(**_unet_kwargs(config), rngs=nnx.Rngs(seed))
    assert not np.array_equal(np.asarray(ours), np.asarray(nnx.state(from_root, nnx.Param)["conv_in"]["kernel"][...]))
    # The preview noise is independent of the initial weights (it was a monotone function of them).
    noise = jax.random.normal(purpose_key(seed, "preview"), (ours.size,))
    assert abs(np.corrcoef(np.asarray(noise), np.asarray(ours).ravel())[0, 1]) < 0.5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.max_consecutive_skips=2", "--config.learning_rate=1e30"], "consecutive steps had a non-finite"),
    ],
)
def test_runtime_stops_are_one_line(tmp_path, args, message):
    result = run_child(train_cmd(tmp_path / "out", "--config.max_train_steps=20", "--config.log_every=1", *args))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train_flax.py: error:") and message in last, last
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_resuming_with_another_seed_or_batch_and_an_unwritable_output_dir_are_one_line(tmp_path):
    train_and_evaluate(tiny_config(tmp_path, max_train_steps=2, checkpointing_steps=2, use_ema=True))
    out = tmp_path / "out"
    blocked = tmp_path / "a_file"
    blocked.write_text("in the way")
    for args, message in [
        (["--config.seed=1"], "seed 0 (now 1)"),
        (["--config.train_batch_size=4"], "global_batch_size 16 (now 32)"),
    ]:
        result = run_child(
            train_cmd(out, "--config.max_train_steps=4", "--config.resume_from_checkpoint=latest", *args)
        )
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert last.startswith("train_flax.py: error: checkpoint 2 in") and message in last, last
        assert "resume with the same seed" in last
    result = run_child(train_cmd(blocked / "run"))
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last.startswith("train_flax.py: error: output_dir") and "not writable" in last, last
    assert "compiled" not in result.stderr  # stopped before compiling anything
