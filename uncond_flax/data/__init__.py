"""Input pipeline: dataset sources, diffusers-style transforms, and the grain loader feeding global jax.Arrays.

Importing this package does not import JAX (grain's worker processes import these modules); JAX is imported
inside the functions that need it.
"""

from uncond_flax.data.loader import TrainLoader, build_train_loader, check_resolution, process_rows
from uncond_flax.data.sources import ImageSource, open_source, select_image_column
from uncond_flax.data.steps import BatchLayout, StepReader, epoch_permutation
from uncond_flax.data.transforms import BadImageError

__all__ = [
    "BadImageError",
    "BatchLayout",
    "ImageSource",
    "StepReader",
    "TrainLoader",
    "build_train_loader",
    "check_resolution",
    "epoch_permutation",
    "open_source",
    "process_rows",
    "select_image_column",
]
