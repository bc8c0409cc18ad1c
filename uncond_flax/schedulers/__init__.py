"""Jittable DDPM/DDIM noise schedulers, numerically compatible with diffusers' PyTorch schedulers."""

from .common import DIFFUSERS_VERSION, FlaxSchedulerOutput, rescale_zero_terminal_snr
from .ddim import FlaxDDIMScheduler
from .ddpm import FlaxDDPMScheduler

__all__ = [
    "DIFFUSERS_VERSION",
    "FlaxDDIMScheduler",
    "FlaxDDPMScheduler",
    "FlaxSchedulerOutput",
    "rescale_zero_terminal_snr",
]
