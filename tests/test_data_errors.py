"""Data errors as users meet them: the train command ends with one line naming the file or field and what to do."""

import os

import datasets
import numpy as np
import PIL.Image
from fixtures.data_factory import gradient, make_image_folder
from test_checkpointing import run_child, train_cmd


def _train(tmp_path, *overrides):
    """train_flax.py on tests/fixtures/tiny_digits.py with `overrides`; (returncode, stderr lines)."""
    proc = run_child(train_cmd(tmp_path / "run", "--config.max_train_steps=2", *overrides))
    return proc.returncode, [line for line in proc.stderr.splitlines() if line.strip()]


def _assert_one_line_error(rc, lines, pattern):
    assert rc == 1, lines[-20:]
    assert not any(line.startswith("Traceback") for line in lines), lines
    assert lines[-1].startswith("train_flax.py: error: "), lines[-5:]  # the error is what the user sees last
    assert pattern in lines[-1], lines[-1]


def test_bad_image_mid_run_is_the_last_line_even_from_grain_workers(tmp_path):
    # 15 images + a corrupt one: the first global batch (2 per device x 8 devices) holds every image.
    make_image_folder(str(tmp_path / "imgs"), n_rgb=9, corrupt=True)
    assert len(os.listdir(tmp_path / "imgs")) == 16
    rc, lines = _train(
        tmp_path,
        "--config.dataset_name=None",
        f"--config.train_data_dir={tmp_path / 'imgs'}",
        "--config.dataloader_num_workers=2",
    )
    _assert_one_line_error(rc, lines, "corrupt.jpg")
    assert lines[-1].endswith("fix or remove that file, or set skip_bad_images=True to train on the other images")


def test_image_column_naming_labels_is_one_line_before_compiling(tmp_path):
    images = [PIL.Image.fromarray(gradient(8, 8, i)) for i in range(16)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    os.makedirs(tmp_path / "parquet")
    datasets.Dataset.from_dict({"img": images, "label": list(range(16))}, features=features).to_parquet(
        str(tmp_path / "parquet" / "train.parquet")
    )
    rc, lines = _train(
        tmp_path,
        "--config.dataset_name=None",
        f"--config.train_data_dir={tmp_path / 'parquet'}",
        "--config.image_column=label",
    )
    _assert_one_line_error(rc, lines, "the image column 'label' of ")
    assert "holds Value('int64'), not images" in lines[-1] and lines[-1].endswith("set image_column to one of ['img']")
    assert not any("compiled" in line for line in lines)


def test_dataset_name_and_train_data_dir_both_set_is_one_line(tmp_path):
    os.makedirs(tmp_path / "imgs")
    PIL.Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / "a.png")
    # tiny_digits sets dataset_name=digits; a train_data_dir given on top of it was silently ignored
    rc, lines = _train(tmp_path, f"--config.train_data_dir={tmp_path / 'imgs'}")
    _assert_one_line_error(rc, lines, "dataset_name 'digits' and train_data_dir ")
    assert "are both set; set only one (--config.dataset_name=None trains on train_data_dir)" in lines[-1]
