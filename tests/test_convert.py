"""Checkpoints of a tiny training run, read by `convert` and `sample --checkpoint`: errors in the command's own words,
damaged checkpoints refused in one line, and sampling a checkpoint equals sampling its exported pipeline."""

import os
import shutil
import sys

import numpy as np
import pytest
from diffusers import DDPMPipeline
from test_checkpointing import kernel, run_child, saved_state
from test_train import tiny_config

from uncond_flax.convert import main as convert
from uncond_flax.sample import main as sample
from uncond_flax.train import train_and_evaluate


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished two-step run (EMA on) with checkpoints 1 and 2; tests copy it before damaging anything."""
    root = tmp_path_factory.mktemp("run")
    config = tiny_config(
        root, max_train_steps=2, checkpointing_steps=1, use_ema=True, save_images_epochs=1000, save_model_epochs=1000
    )
    train_and_evaluate(config)
    return root / "out"


def _error(run, argv):
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    message = str(exit_info.value.code)
    assert "\n" not in message, message
    return message


def _largest_array_file(step_dir):
    return max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)


def test_errors_name_the_checkpoint_not_a_config_field(tmp_path, run_dir):
    checkpoints = run_dir / "checkpoints"
    message = _error(convert, [str(checkpoints / "5"), "--output", str(tmp_path / "x")])
    assert message == f"uncond_flax.convert: error: no checkpoint 5 in {checkpoints} (found: 1, 2)"
    message = _error(convert, [str(tmp_path / "nowhere"), "--output", str(tmp_path / "x")])
    assert message.startswith(f"uncond_flax.convert: error: {tmp_path / 'nowhere'}: no such directory; give a step")
    (tmp_path / "empty").mkdir()
    message = _error(convert, [str(tmp_path / "empty"), "--output", str(tmp_path / "x")])
    assert message == f"uncond_flax.convert: error: no checkpoint in {tmp_path / 'empty'}"
    assert not (tmp_path / "x").exists()


def test_a_damaged_checkpoint_exits_nonzero_with_one_line_and_a_directory_falls_back(tmp_path, run_dir, caplog):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    array_file = _largest_array_file(run / "checkpoints" / "2")
    array_file.write_bytes(array_file.read_bytes()[:100])

    # The real command: non-zero, its last line the error naming the checkpoint, no traceback, nothing written.
    proc = run_child(
        [sys.executable, "-m", "uncond_flax.convert", str(run / "checkpoints" / "2"), "--output", str(tmp_path / "x")]
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"uncond_flax.convert: error: checkpoint 2 in {run / 'checkpoints'}")
    assert not (tmp_path / "x").exists()

    # A checkpoints directory (or the run's output_dir): the newest step that verifies, the skipped one named.
    with caplog.at_level("WARNING", logger="uncond_flax"):
        assert convert([str(run), "--output", str(tmp_path / "latest")]) == 0
    assert f"skipping checkpoint 2 in {run / 'checkpoints'}" in caplog.text
    exported = DDPMPipeline.from_pretrained(str(tmp_path / "latest")).unet.state_dict()["conv_out.weight"].numpy()
    np.testing.assert_array_equal(exported, kernel(saved_state(run_dir, 1)["ema_params"], "conv_out"))

    for step in (1, 2):
        shutil.rmtree(run / "checkpoints" / str(step) / "state")
    message = _error(convert, [str(run / "checkpoints"), "--output", str(tmp_path / "none")])
    assert message.startswith(f"uncond_flax.convert: error: no checkpoint in {run / 'checkpoints'} verifies (")


def test_sample_from_a_checkpoint_equals_sampling_its_export(tmp_path, run_dir):
    checkpoints = str(run_dir / "checkpoints")
    args = ["--num_images", "3", "--num_inference_steps", "3", "--seed", "2"]
    assert sample(["--checkpoint", checkpoints, *args, "--output_dir", str(tmp_path / "ckpt")]) == 0
    assert sample(["--checkpoint", checkpoints, "--raw", *args, "--output_dir", str(tmp_path / "raw")]) == 0
    assert convert([os.path.join(checkpoints, "2"), "--output", str(tmp_path / "pipeline")]) == 0
    assert sample(["--pipeline", str(tmp_path / "pipeline"), *args, "--output_dir", str(tmp_path / "pipe")]) == 0

    def images(name):
        with np.load(tmp_path / name / "samples.npz") as f:
            return f["arr_0"]

    assert images("ckpt").shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(images("ckpt"), images("pipe"))
    assert np.abs(images("raw").astype(int) - images("ckpt")).max() > 0  # --raw samples the other weights
