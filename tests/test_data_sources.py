"""Dataset sources: imagefolder, parquet, arrow, save_to_disk, TFDS (committed fixture), digits, and their errors."""

import io
import os
import re
import shutil
import subprocess
import sys

import datasets
import numpy as np
import PIL.Image
import pytest
from fixtures.data_factory import TFDS_DIR, TFDS_NAME, data_config, gradient, make_image_folder

from uncond_flax.data import sources
from uncond_flax.data.sources import DigitsSource, open_source, select_image_column
from uncond_flax.data.transforms import load_resized


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A small datasets.Dataset (column "img", as cifar10) written as parquet, arrow and save_to_disk."""
    root = tmp_path_factory.mktemp("hf")
    images = [PIL.Image.fromarray(gradient(12 + i, 20, 10 * i)) for i in range(6)]
    ds = datasets.Dataset.from_dict(
        {"img": images, "label": list(range(6))},
        features=datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")}),
    )
    os.makedirs(root / "parquet")
    ds.to_parquet(str(root / "parquet" / "train-00000.parquet"))
    ds.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(root / "saved_dict"))
    os.makedirs(root / "arrow")
    arrow_file = next(f for f in os.listdir(root / "saved") if f.endswith(".arrow"))
    shutil.copy(root / "saved" / arrow_file, root / "arrow" / "train.arrow")
    return root


def _red_values(source):
    return [int(load_resized(source.get_raw(i), 8, "RGB")[0, 0, 0]) for i in range(len(source))]


def test_imagefolder_reads_every_mode(tmp_path):
    paths = make_image_folder(str(tmp_path / "imgs"), n_rgb=4)
    source = open_source(data_config(train_data_dir=str(tmp_path / "imgs"), cache_dir=str(tmp_path / "cache")))
    assert len(source) == len(paths) and source.column == "image"
    for i in range(len(source)):
        for mode, channels in (("RGB", 3), ("L", 1)):
            out = load_resized(source.get_raw(i), 16, mode)
            assert out.dtype == np.uint8 and out.shape[2] == channels and min(out.shape[:2]) == 16


@pytest.mark.parametrize("kind", ["parquet", "parquet_file", "arrow", "saved", "saved_dict", "as_dataset_name"])
def test_local_hf_formats(hf_dirs, tmp_path, kind):
    path = {"parquet_file": hf_dirs / "parquet" / "train-00000.parquet"}.get(kind, hf_dirs / kind.split("_file")[0])
    if kind == "as_dataset_name":  # a local path given as dataset_name goes the same way
        config = data_config(dataset_name=str(hf_dirs / "saved"), cache_dir=str(tmp_path))
    else:
        config = data_config(train_data_dir=str(path), cache_dir=str(tmp_path))
    source = open_source(config)
    assert len(source) == 6 and source.column == "img"  # auto-detected: no "image" column, then "img"
    assert _red_values(source) == [10 * i for i in range(6)]


def test_image_column_errors_list_columns(hf_dirs, tmp_path):
    with pytest.raises(ValueError, match=r"image_column 'pixels' is not a column of .*\['img', 'label'\]"):
        open_source(data_config(train_data_dir=str(hf_dirs / "saved"), image_column="pixels"))
    with pytest.raises(ValueError, match=r"none of \['image', 'img'\] among its columns \['a', 'b'\]"):
        select_image_column(["a", "b"], None, "x")
    source = open_source(data_config(train_data_dir=str(hf_dirs / "saved"), image_column="img"))
    assert source.column == "img"


def test_image_column_that_holds_no_images_is_one_line_naming_the_image_columns(hf_dirs, tmp_path):
    with pytest.raises(ValueError) as info:
        open_source(data_config(train_data_dir=str(hf_dirs / "saved"), image_column="label"))
    assert re.fullmatch(
        r"the image column 'label' of .*saved holds Value\('int64'\), not images \(cannot decode example 0: "
        r"ValueError: cannot read an image from a int\); set image_column to one of \['img'\]",
        str(info.value),
    )
    with pytest.raises(ValueError) as info:
        open_source(data_config(dataset_name=f"tfds:{TFDS_NAME}", tfds_data_dir=TFDS_DIR, image_column="label"))
    assert re.fullmatch(
        r"the image column 'label' of tfds:uncond_tiny_images holds ClassLabel, not images \(.*\); "
        r"set image_column to one of \['image'\]",
        str(info.value),
    )
    # a column of encoded bytes (no Image feature) is images all the same
    png = io.BytesIO()
    PIL.Image.fromarray(gradient(8, 8, 3)).save(png, format="PNG")
    os.makedirs(tmp_path / "bytes")
    datasets.Dataset.from_dict({"png": [png.getvalue()] * 3, "caption": ["a"] * 3}).to_parquet(
        str(tmp_path / "bytes" / "train.parquet")
    )
    where = {"train_data_dir": str(tmp_path / "bytes"), "cache_dir": str(tmp_path / "cache")}
    assert open_source(data_config(**where, image_column="png")).column == "png"
    with pytest.raises(ValueError, match=r"'caption' .* holds Value\('string'\), not images .*none of its columns"):
        open_source(data_config(**where, image_column="caption"))


def test_hf_fingerprint_follows_the_images(tmp_path):
    # HFImageSource.fingerprint (the decode cache's key) is datasets' private Dataset._fingerprint, its content
    # hash: no public API gives one. If datasets moves or drops it, this fails, not a user's stale cache.
    def write(value: int) -> None:
        images = [PIL.Image.fromarray(gradient(8, 8, value + i)) for i in range(3)]
        ds = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
        ds.to_parquet(str(tmp_path / "data" / "train.parquet"))
        assert isinstance(ds._fingerprint, str) and ds._fingerprint

    os.makedirs(tmp_path / "data")
    config = data_config(train_data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    write(10)
    first = open_source(config).fingerprint
    assert open_source(config).fingerprint == first  # the same files: the same key
    write(20)  # the same file name and size, other pixels
    stat = os.stat(tmp_path / "data" / "train.parquet")
    os.utime(tmp_path / "data" / "train.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert open_source(config).fingerprint != first


def test_tfds_array_record_fixture_without_tensorflow():
    source = open_source(data_config(dataset_name=f"tfds:{TFDS_NAME}", tfds_data_dir=TFDS_DIR))
    assert len(source) == 12 and source.column == "image"
    assert isinstance(source.get_raw(0), bytes)  # left encoded: PIL decodes, no TensorFlow
    assert sorted(_red_values(source)) == [20 * i for i in range(12)]
    import sys

    assert "tensorflow" not in sys.modules


def test_tfds_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"TFDS dataset 'cifar10' is not prepared in .*tfds build cifar10"):
        open_source(data_config(dataset_name="tfds:cifar10", tfds_data_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="TFDS dataset 'no_such_dataset_xyz' not found"):
        open_source(data_config(dataset_name="tfds:no_such_dataset_xyz", tfds_data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"image_column 'pixels' is not a column of tfds:.*\['image', 'label'\]"):
        open_source(data_config(dataset_name=f"tfds:{TFDS_NAME}", tfds_data_dir=TFDS_DIR, image_column="pixels"))


def test_digits_are_real_sklearn_digits():
    source = open_source(data_config(dataset_name="digits"))
    assert isinstance(source, DigitsSource) and len(source) == 1797
    raw = source.get_raw(0)
    assert raw.shape == (8, 8) and raw.dtype == np.uint8
    every = np.stack([source.get_raw(i) for i in range(len(source))])
    assert every.min() == 0 and every.max() == 255  # 0..16 mapped onto the full uint8 range
    from sklearn.datasets import load_digits

    np.testing.assert_array_equal(every, np.rint(load_digits().images * 255 / 16))
    assert load_resized(raw, 32, "RGB").shape == (32, 32, 3)


def test_digits_are_read_without_importing_sklearn_datasets(tmp_path, monkeypatch):
    # Importing sklearn.datasets costs ~1.8 s of CPU at every start of the demo; its CSV is read directly instead.
    code = (
        "import sys\n"
        "from uncond_flax.data.sources import DigitsSource\n"
        "print(len(DigitsSource()), 'sklearn.datasets' in sys.modules)\n"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.split() == ["1797", "False"]
    # Where scikit-learn keeps the file elsewhere, load_digits reads it: the same images, the same fingerprint.
    direct = DigitsSource()
    monkeypatch.setattr(sources, "_sklearn_digits_csv", lambda: str(tmp_path / "moved.csv.gz"))
    fallback = DigitsSource()
    assert fallback.fingerprint == direct.fingerprint
    np.testing.assert_array_equal(fallback._images, direct._images)


def test_missing_dataset_while_offline_is_one_clear_error(tmp_path):
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"  # set by conftest
    with pytest.raises(FileNotFoundError) as info:
        open_source(data_config(dataset_name="huggan/flowers-102-categories", cache_dir=str(tmp_path)))
    message = str(info.value)
    assert "huggan/flowers-102-categories" in message and "offline" in message and "\n" not in message
    assert info.value.__suppress_context__  # `from None`: no chained traceback forest


def test_config_errors(tmp_path):
    with pytest.raises(
        ValueError, match="You must specify either a dataset name from the hub or a train data directory"
    ):
        open_source(data_config())
    with pytest.raises(
        ValueError,
        match=r"^dataset_name 'digits' and train_data_dir '.*' are both set; set only one "
        r"\(--config.dataset_name=None trains on train_data_dir\)$",
    ):
        open_source(data_config(dataset_name="digits", train_data_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"train_data_dir '.*nope' does not exist"):
        open_source(data_config(train_data_dir=str(tmp_path / "nope")))
    # A dataset_name that is a path is a local dataset, missing or not: never a Hub id to look up.
    for missing in (str(tmp_path / "gone"), "./gone/data", "~/gone/data"):
        with pytest.raises(FileNotFoundError, match=r"^dataset_name '.*gone(/data)?' does not exist$"):
            open_source(data_config(dataset_name=missing, cache_dir=str(tmp_path)))
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="contains no images, .parquet or .arrow files"):
        open_source(data_config(train_data_dir=str(tmp_path / "empty")))


@pytest.mark.parametrize("field", ["dataset_name", "train_data_dir"])
def test_a_folder_under_home_is_read_from_a_tilde_path(tmp_path, monkeypatch, field):
    os.makedirs(tmp_path / "home" / "imgs")
    for i in range(3):
        PIL.Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(tmp_path / "home" / "imgs" / f"{i}.png")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    source = open_source(data_config(**{field: "~/imgs"}, cache_dir=str(tmp_path / "cache")))
    assert len(source) == 3
