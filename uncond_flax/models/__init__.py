"""Flax (nnx) versions of diffusers' UNet2DModel and its parts, NHWC."""

from uncond_flax.models.embeddings import Buffer
from uncond_flax.models.unet_2d import UNET2D_DEFAULTS, FlaxUNet2DModel, downsampling_factor, resolve_unet_config

__all__ = ["Buffer", "FlaxUNet2DModel", "UNET2D_DEFAULTS", "downsampling_factor", "resolve_unet_config"]
