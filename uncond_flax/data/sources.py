"""Image sources: random access to one dataset's encoded images, wherever they come from.

``open_source(config)`` picks one from the config as diffusers' ``train_unconditional.py`` does (``dataset_name``
from the Hub or a local path, else ``train_data_dir`` as an imagefolder), and adds local parquet / arrow /
``save_to_disk`` folders, TFDS (``dataset_name="tfds:NAME[/CONFIG][:VERSION]"``) and the sklearn ``digits``.

Sources are pickled into grain's worker processes, so they hold only cheap, picklable state (HF datasets
pickle as memory-mapped arrow files). This module must not import JAX.
"""

from __future__ import annotations

import abc
import gzip
import hashlib
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from uncond_flax import storage

DIGITS = "digits"
TFDS_PREFIX = "tfds:"
IMAGE_COLUMN_CANDIDATES = ("image", "img")
_IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jp2", ".ico"}


class ImageSource(abc.ABC):
    """Random access to the encoded images of one dataset split."""

    name: str  # what error messages call it: a dataset name or a path

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def get_raw(self, index: int) -> Any:
        """The example's undecoded image: bytes, ``{"bytes", "path"}``, a path, an array or a PIL image."""

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Changes whenever the images change; keys the decode cache."""


def select_image_column(columns: Sequence[str], image_column: str | None, dataset: str) -> str:
    """``image_column`` if given, else the first of ``image``, ``img`` present; else a ValueError listing columns."""
    columns = list(columns)
    if image_column is not None:
        if image_column not in columns:
            raise ValueError(f"image_column {image_column!r} is not a column of {dataset}; its columns are {columns}")
        return image_column
    for candidate in IMAGE_COLUMN_CANDIDATES:
        if candidate in columns:
            return candidate
    raise ValueError(
        f"cannot find the image column of {dataset}: none of {list(IMAGE_COLUMN_CANDIDATES)} among its columns "
        f"{columns}; set image_column"
    )


def check_holds_images(source: ImageSource, column: str, feature: Any, image_columns: list[str]) -> None:
    """ValueError unless ``column`` is an image feature or its first example decodes as an image: an
    ``image_column`` naming labels or captions fails here, in one line, not at the first batch."""
    if len(source) == 0:
        return
    from uncond_flax.data.transforms import describe_failure, load_resized

    raw = None
    try:
        raw = source.get_raw(0)
        load_resized(raw, 1, "RGB")
    except Exception as e:  # noqa: BLE001 -- anything that is not an image
        where = f"set image_column to one of {image_columns}" if image_columns else "none of its columns holds images"
        raise ValueError(
            f"the image column {column!r} of {source.name} holds {feature}, not images ({describe_failure(0, raw, e)}); "
            f"{where}"
        ) from None


# --------------------------------------------------------------------------------------------------------------
# Hugging Face datasets (Hub, imagefolder, parquet, arrow, save_to_disk)


class HFImageSource(ImageSource):
    """One column of a ``datasets.Dataset``, read without decoding (we decode, to name bad examples)."""

    def __init__(self, dataset: Any, image_column: str | None, name: str):
        self.name = name
        self.column = select_image_column(dataset.column_names, image_column, name)
        # Only the image column, as raw arrow values: an Image column then reads as {"bytes", "path"} and the
        # other columns (captions, labels) are never touched.
        self._dataset = dataset.select_columns([self.column]).with_format("arrow")
        import datasets

        feature = dataset.features[self.column]
        if not isinstance(feature, datasets.Image):
            images = [c for c, f in dataset.features.items() if isinstance(f, datasets.Image)]
            check_holds_images(self, self.column, feature, images)

    def __len__(self) -> int:
        return len(self._dataset)

    def get_raw(self, index: int) -> Any:
        raw = self._dataset[int(index)].column(0)[0].as_py()
        if isinstance(raw, dict) and raw.get("bytes") is None and raw.get("path") and not os.path.isfile(raw["path"]):
            # a remote or in-archive path (e.g. "zip://...::https://..."): datasets knows how to open those
            import datasets

            return datasets.Image().decode_example(raw)
        return raw

    @property
    def fingerprint(self) -> str:
        # datasets' private content hash (no public API has one); test_hf_fingerprint_follows_the_images fails if it moves
        return f"hf:{self._dataset._fingerprint}:{self.column}"


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _hf_call(what: str, fn, *args, **kwargs):
    """Runs a ``datasets`` loader, turning its not-found / offline / bad-config failures into one clear error."""
    import datasets

    try:
        return fn(*args, **kwargs)
    except ConnectionError as e:
        where = kwargs.get("cache_dir") or datasets.config.HF_DATASETS_CACHE
        why = (
            "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
            if _offline()
            else f"the Hub cannot be reached ({e})"
        )
        raise FileNotFoundError(f"{what} is not in the local datasets cache ({where}) and {why}") from None
    except datasets.exceptions.DatasetNotFoundError as e:
        raise FileNotFoundError(f"{what} not found: {str(e).splitlines()[0]}") from None
    except datasets.data_files.EmptyDatasetError:
        raise FileNotFoundError(f"{what}: no data files found") from None
    except ValueError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "config" in msg.lower() or "split" in msg.lower():
            raise ValueError(f"{what}: {msg}") from None
        raise


def _hub_source(config: Any) -> ImageSource:
    import datasets

    name, config_name = config.dataset_name, config.dataset_config_name
    what = f"dataset {name!r}" + (f" (config {config_name!r})" if config_name else "")
    ds = _hf_call(what, datasets.load_dataset, name, config_name, cache_dir=config.cache_dir, split="train")
    return HFImageSource(ds, config.image_column, name)


def _files_with(path: str, extensions: set[str]) -> list[str]:
    found = []
    for root, _, files in os.walk(path):
        found.extend(os.path.join(root, f) for f in files if os.path.splitext(f)[1].lower() in extensions)
    return sorted(found)


def _local_source(path: str, config: Any, field: str) -> ImageSource:
    """A local folder of images (imagefolder), parquet or arrow files, a ``save_to_disk`` folder, or one file."""
    import datasets

    what = f"{field} {path!r}"
    cache_dir = config.cache_dir
    if storage.is_remote(path):  # datasets' loaders take local files (offline they refuse URLs): a local copy
        from uncond_flax.data.decode_cache import default_cache_root  # that module imports this one

        path = storage.local_mirror(path, cache_dir or default_cache_root())
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} does not exist")
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in (".parquet", ".arrow"):
            raise ValueError(f"{what} is a file but not .parquet or .arrow; pass a folder of images instead")
        ds = _hf_call(what, datasets.load_dataset, ext[1:], data_files=path, cache_dir=cache_dir, split="train")
        return HFImageSource(ds, config.image_column, path)
    if os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(os.path.join(path, "state.json")):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{what} (save_to_disk) has no 'train' split; its splits are {list(ds)}")
            ds = ds["train"]
        return HFImageSource(ds, config.image_column, path)
    # diffusers' train_data_dir is an imagefolder; a folder with no images but parquet/arrow files is that format.
    if _files_with(path, _IMAGE_EXTENSIONS):
        builder, kwargs = "imagefolder", {"data_dir": path}
    elif parquet := _files_with(path, {".parquet"}):
        builder, kwargs = "parquet", {"data_files": parquet}
    elif arrow := _files_with(path, {".arrow"}):
        builder, kwargs = "arrow", {"data_files": arrow}
    else:
        raise FileNotFoundError(f"{what} contains no images, .parquet or .arrow files")
    ds = _hf_call(what, datasets.load_dataset, builder, cache_dir=cache_dir, split="train", **kwargs)
    return HFImageSource(ds, config.image_column, path)


# --------------------------------------------------------------------------------------------------------------
# TFDS (array_record / parquet data sources: random access without TensorFlow)


class TFDSImageSource(ImageSource):
    """``tfds.data_source(...)`` with the image feature left encoded (we decode with PIL, no TensorFlow)."""

    def __init__(self, spec: str, data_dir: str | None, image_column: str | None):
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise ImportError(
                f"dataset_name 'tfds:{spec}' needs tensorflow-datasets (pip install tensorflow-datasets array_record)"
            ) from None
        self.name = f"tfds:{spec}"
        where = data_dir or "the default TFDS data dir"
        try:
            builder = tfds.builder(spec, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise FileNotFoundError(f"TFDS dataset {spec!r} not found in {where} nor in the TFDS catalog") from None
        except ValueError as e:
            raise ValueError(f"TFDS dataset {spec!r}: {str(e).splitlines()[0]}") from None
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {spec!r} is not prepared in {where}; build it once (needs TensorFlow and network) with "
                f"`tfds build {spec.split(':')[0]} --file_format=array_record` and set tfds_data_dir"
            )
        if "train" not in builder.info.splits:
            raise ValueError(f"TFDS dataset {spec!r} has no 'train' split; its splits are {list(builder.info.splits)}")
        features = builder.info.features
        self.column = select_image_column(sorted(features.keys()), image_column, self.name)
        is_image = isinstance(features[self.column], tfds.features.Image)
        decoders = {self.column: tfds.decode.SkipDecoding()} if is_image else None
        try:
            self._source = builder.as_data_source(split="train", decoders=decoders)
        except NotImplementedError:
            raise ValueError(
                f"TFDS dataset {spec!r} in {where} is stored as {builder.info.file_format}; random access needs "
                "array_record (rebuild with --file_format=array_record)"
            ) from None
        self._fingerprint = f"tfds:{builder.info.full_name}:{os.path.abspath(builder.data_dir)}:{len(self._source)}"
        if not is_image:
            images = sorted(k for k, f in features.items() if isinstance(f, tfds.features.Image))
            check_holds_images(self, self.column, type(features[self.column]).__name__, images)
        if not is_image:
            images = sorted(k for k, f in features.items() if isinstance(f, tfds.features.Image))
            check_holds_images(self, self.column, type(features[self.column]).__name__, images)

    def __len__(self) -> int:
        return len(self._source)

    def get_raw(self, index: int) -> Any:
        return self._source[int(index)][self.column]

    @property
    def fingerprint(self) -> str:
        return self._fingerprint


# --------------------------------------------------------------------------------------------------------------
# sklearn digits: the offline, embedded default


def _sklearn_digits_csv() -> str | None:
    """The file scikit-learn's `load_digits` reads (not importing sklearn), or None where sklearn is missing."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")


def _sklearn_digits() -> np.ndarray:
    """`sklearn.datasets.load_digits().images`: (1797, 8, 8) float64 in [0, 16].

    Read from its gzipped CSV directly (1,797 rows of 64 pixels and the label), as `load_digits` does: importing
    `sklearn.datasets` costs ~1.8 s of CPU, more than the rest of the demo's data setup. Where a scikit-learn
    keeps that file elsewhere, or in another shape, `load_digits` reads it.
    """
    path = _sklearn_digits_csv()
    if path is not None and os.path.isfile(path):
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",")
        if table.shape == (1797, 65):
            return table[:, :-1].reshape(-1, 8, 8)
    from sklearn.datasets import load_digits

    return load_digits().images


class DigitsSource(ImageSource):
    """The 1,797 real 8×8 handwritten digits shipped inside scikit-learn, as uint8 grayscale (0..16 → 0..255)."""

    name = DIGITS

    def __init__(self):
        images = _sklearn_digits()  # float64 in [0, 16]
        self._images = np.rint(images * (255.0 / 16.0)).astype(np.uint8)
        self._fingerprint = "sklearn-digits:" + hashlib.sha256(self._images.tobytes()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self._images)

    def get_raw(self, index: int) -> np.ndarray:
        return self._images[int(index)]

    @property
    def fingerprint(self) -> str:
        return self._fingerprint


# --------------------------------------------------------------------------------------------------------------


def open_source(config: Any) -> ImageSource:
    """The training split named by ``config`` (dataset_name, dataset_config_name, train_data_dir, cache_dir,
    image_column, tfds_data_dir); errors are one line naming the dataset or path."""
    name, data_dir = config.dataset_name, config.train_data_dir
    if config.cache_dir and storage.is_remote(config.cache_dir):
        raise ValueError(
            f"cache_dir {config.cache_dir!r} must be a local folder (caches are memory-mapped); data in a bucket "
            "goes in train_data_dir or dataset_name, and is copied once into the local cache_dir"
        )
    if name is None and data_dir is None:
        raise ValueError("You must specify either a dataset name from the hub or a train data directory.")
    if name is not None and data_dir is not None:  # diffusers ignores train_data_dir then: surely not what was meant
        raise ValueError(
            f"dataset_name {name!r} and train_data_dir {data_dir!r} are both set; set only one "
            "(--config.dataset_name=None trains on train_data_dir)"
        )
    if name is not None:
        if name == DIGITS:
            return DigitsSource()
        if name.startswith(TFDS_PREFIX):
            return TFDSImageSource(name[len(TFDS_PREFIX) :], config.tfds_data_dir, config.image_column)
        if storage.is_remote(name) or os.path.exists(name) or name.startswith(("/", "./", "../", "~")):  # not a Hub id
            return _local_source(os.path.expanduser(name), config, "dataset_name")
        return _hub_source(config)
    return _local_source(os.path.expanduser(data_dir), config, "train_data_dir")
