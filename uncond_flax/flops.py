"""FLOPs per step of a traced program, achieved FLOP/s, and model FLOPs utilisation (MFU) per chip.

traced = jax.jit(train_step).trace(state, images)
flops = step_flops(traced, jax.device_count())   # per device: the whole program's count, split evenly
utilisation = mfu(flops, seconds_per_step, jax.devices(), "bf16")   # None where the peak is unknown
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

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


def _valid_taps(in_size: int, kernel: int, out_size: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int) -> int:
    """(output position, kernel tap) pairs of one spatial axis whose tap reads the (dilated) input, not padding."""
    pos = np.arange(out_size)[:, None] * stride - pad_lo + np.arange(kernel)[None, :] * rhs_dil
    return int(np.count_nonzero((pos >= 0) & (pos <= (in_size - 1) * lhs_dil) & (pos % lhs_dil == 0)))


def _conv_macs(eqn: Any) -> int:
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    out = eqn.outvars[0].aval.shape
    p = eqn.params
    dims = p["dimension_numbers"]
    taps = 1
    for i in range(len(dims.lhs_spec) - 2):
        taps *= _valid_taps(
            lhs[dims.lhs_spec[2 + i]],
            rhs[dims.rhs_spec[2 + i]],
            out[dims.out_spec[2 + i]],
            p["window_strides"][i],
            p["padding"][i][0],
            p["lhs_dilation"][i],
            p["rhs_dilation"][i],
        )
    # Every output element (batch, feature, position) sums its input features (per group) over its valid taps.
    return out[dims.out_spec[0]] * out[dims.out_spec[1]] * rhs[dims.rhs_spec[1]] * taps


def _dot_macs(eqn: Any) -> int:
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    shared = math.prod(rhs[d] for d in (*rhs_contract, *rhs_batch))
    return math.prod(lhs) * math.prod(rhs) // max(shared, 1)


def jaxpr_flops(jaxpr: Any, used: Sequence[bool] | None = None) -> int:
    """FLOPs (2 per multiply-add) of the matrix products and convolutions in a jaxpr, loops and calls included.

    What MFU counts: the work of the model's dense layers, by shapes alone, so equal on every backend. Like
    XLA, it skips work whose results nothing uses (a vjp's discarded primal, outputs not in `used`) and a
    convolution's taps that fall on padding. A `while` body counts once.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # a ClosedJaxpr
    used = [True] * len(jaxpr.outvars) if used is None else used
    live = {v for v, u in zip(jaxpr.outvars, used) if u and not hasattr(v, "val")}  # `val`: a literal
    total = 0
    for eqn in reversed(jaxpr.eqns):
        outs = [v in live for v in eqn.outvars]
        if not any(outs) and not eqn.effects:
            continue
        total += _eqn_flops(eqn, outs)
        live.update(v for v in eqn.invars if not hasattr(v, "val"))
    return total


def _eqn_flops(eqn: Any, outs: list[bool]) -> int:
    name, params = eqn.primitive.name, eqn.params
    if name == "conv_general_dilated":
        return 2 * _conv_macs(eqn)
    if name == "dot_general":
        return 2 * _dot_macs(eqn)
    if name == "cond":
        return max(jaxpr_flops(branch, outs) for branch in params["branches"])
    if name in ("scan", "while"):  # the carry feeds the next iteration: count the whole body
        body = params.get("jaxpr") or params["body_jaxpr"]
        return params.get("length", 1) * jaxpr_flops(body)
    for key in ("jaxpr", "call_jaxpr"):  # pjit, closed_call, remat, custom_jvp/vjp: outputs map one to one
        sub = params.get(key)
        if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
            n = len(getattr(sub, "jaxpr", sub).outvars)
            return jaxpr_flops(sub, outs if n == len(outs) else None)
    return 0


def step_flops(traced: Any, num_devices: int = 1) -> float | None:
    """FLOPs of one call of a traced (`jax.jit(f).trace(...)`) program per device; None if it has none.

    Counted from the program's jaxpr (`jaxpr_flops`) and split evenly over `num_devices`. Not from XLA's cost
    analysis: compiled for a GPU, convolutions become cuDNN calls that it counts as 0 FLOPs (the default UNet's
    bf16 step at batch 64 on an H100: 7.84e10 of 5.68e12), and the lowered program's analysis is not available
    on GPU or TPU. Work every device repeats (a replicated optimizer update) is counted once: a small share.
    """
    flops = jaxpr_flops(traced.jaxpr)
    return flops / num_devices if flops > 0 else None


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
