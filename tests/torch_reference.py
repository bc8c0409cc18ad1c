"""Helpers shared by the parity tests: random diffusers models and NCHW<->NHWC conversions."""

from __future__ import annotations

import numpy as np
import torch


def randomized_torch_unet(config: dict, seed: int = 0):
    """A diffusers UNet2DModel whose every parameter (norm affines included) is randomised, in eval mode."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel(**config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def nchw(x_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x_nhwc).transpose(0, 3, 1, 2)))


def nhwc(x_nchw: torch.Tensor) -> np.ndarray:
    return x_nchw.detach().numpy().transpose(0, 2, 3, 1)
