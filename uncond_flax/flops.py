"""FLOPs per step from XLA's cost analysis, achieved FLOP/s, and model FLOPs utilisation (MFU) per chip.

compiled = jax.jit(train_step).lower(state, images).compile()
flops = step_flops(compiled)                       # per device, as XLA counts the partitioned program
utilisation = mfu(flops, seconds_per_step, jax.devices(), "bf16")   # None where the peak is unknown
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

# Dense (no 2:4 sparsity) peak FLOP/s per chip, from the vendors' data sheets. NVIDIA's sheets print the
# sparse figure for tensor cores; the dense one is half of it. Keys are lower-case substrings of
# `jax.Device.device_kind`, most specific first.
#   "half": bf16/fp16 inputs on tensor cores / the MXU.
#   "fp32": what a float32 matmul gets under JAX's default precision: TF32 tensor cores on A100/H100/H200
#           (XLA:GPU allows TF32 for f32 dots and convolutions at default precision), and one bf16 MXU pass
#           on TPUs (Google publishes no separate fp32 peak; default precision runs f32 matmuls at bf16 rate).
_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("tpu v4", {"half": 275e12, "fp32": 275e12}),  # Cloud TPU v4: 275 TFLOPS bf16 per chip
    ("tpu v5 lite", {"half": 197e12, "fp32": 197e12}),  # v5e: 197 TFLOPS bf16
    ("tpu v5e", {"half": 197e12, "fp32": 197e12}),
    ("tpu v5p", {"half": 459e12, "fp32": 459e12}),  # v5p: 459 TFLOPS bf16
    ("tpu v5", {"half": 459e12, "fp32": 459e12}),  # JAX names the v5p chip "TPU v5"
    ("tpu v6 lite", {"half": 918e12, "fp32": 918e12}),  # v6e (Trillium): 918 TFLOPS bf16
    ("tpu v6e", {"half": 918e12, "fp32": 918e12}),
    ("a100", {"half": 312e12, "fp32": 156e12}),  # A100 SXM and PCIe: bf16 312, TF32 156 (dense)
    ("h100 nvl", {"half": 835.5e12, "fp32": 417.5e12}),  # H100 NVL: bf16 1671 / TF32 835 sparse
    ("h100 pcie", {"half": 756.5e12, "fp32": 378e12}),  # H100 PCIe: bf16 1513 / TF32 756 sparse
    ("h100", {"half": 989.5e12, "fp32": 494.5e12}),  # H100 SXM ("H100 80GB HBM3"): bf16 1979 / TF32 989 sparse
    ("h200 nvl", {"half": 835.5e12, "fp32": 417.5e12}),  # H200 NVL: bf16 1671 / TF32 835 sparse
    ("h200", {"half": 989.5e12, "fp32": 494.5e12}),  # H200 SXM: as H100 SXM
)

_HALF_NAMES = {"bf16", "fp16", "bfloat16", "float16"}
_FP32_NAMES = {"no", "fp32", "float32", "tf32"}


def _precision(dtype: Any) -> str:
    """ "half" or "fp32" from a mixed_precision value ("no", "bf16", "fp16") or a dtype."""
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name in _HALF_NAMES:
        return "half"
    if name in _FP32_NAMES:
        return "fp32"
    raise ValueError(f"dtype {dtype!r}: use one of {sorted(_HALF_NAMES | _FP32_NAMES)}")


def step_flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled (`.lower(...).compile()`) program on one device; None if XLA gives none.

    For a program partitioned over several devices XLA analyses the per-device program, so this is per device.
    """
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 -- some backends do not implement cost analysis
        return None
    if isinstance(analysis, (list, tuple)):  # older JAX returned one dict per program
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def peak_flops(device: Any, dtype: Any = "bf16") -> float | None:
    """Dense peak FLOP/s of one chip (`jax.Device`) at `dtype` ("no"/"fp32", "bf16", "fp16"); None if unknown."""
    kind = str(getattr(device, "device_kind", device)).lower()
    precision = _precision(dtype)
    for key, peaks in _PEAKS:
        if key in kind:
            return peaks[precision]
    return None


def mfu(
    flops_per_step: float | None, seconds_per_step: float, devices: Sequence[Any] | Any, dtype: Any = "bf16"
) -> float | None:
    """Model FLOPs utilisation: per-device `flops_per_step` (as `step_flops` gives) over one chip's peak.

    `devices`: the devices the step runs on, or one of them; None where the FLOPs or the peak are unknown.
    """
    device = devices[0] if isinstance(devices, (list, tuple)) else devices
    peak = peak_flops(device, dtype)
    if flops_per_step is None or peak is None or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / peak
