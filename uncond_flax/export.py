"""Between Flax UNets and diffusers folders: state-dict conversion, `load_unet`, `save_pipeline`. No torch needed.

Our parameter paths are diffusers' module paths; only the leaves differ: conv kernels are HWIO here and OIHW in
PyTorch, linear kernels are (in, out) here and (out, in) there, and norm `scale` is torch's `weight`.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uncond_flax import storage
from uncond_flax.models import FlaxUNet2DModel
from uncond_flax.rng import rngs_outside_traces
from uncond_flax.schedulers import DIFFUSERS_VERSION, FlaxDDPMScheduler

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model"

# Pre-0.14 diffusers attention blocks stored these names; `from_pretrained` renames them the same way.
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _torch_name(path: tuple) -> str:
    *module, leaf = (str(p) for p in path)
    return ".".join([*module, {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)])


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def _from_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def to_state_dict(state: nnx.State | FlaxUNet2DModel) -> dict[str, np.ndarray]:
    """Flax model or state -> diffusers-named numpy state dict in PyTorch layout (float dtypes kept)."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state)
    out = {}
    for path, var in nnx.to_flat_state(state):
        value = np.asarray(jax.device_get(var[...] if hasattr(var, "__getitem__") else var))
        out[_torch_name(path)] = np.ascontiguousarray(_to_torch_layout(str(path[-1]), value))
    return out


def rename_legacy_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Map old attention names (query/key/value/proj_attn) to the current ones."""
    renamed = {}
    for name, value in state_dict.items():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION_NAMES:
            parts[-2] = _LEGACY_ATTENTION_NAMES[parts[-2]]
        renamed[".".join(parts)] = value
    return renamed


def from_state_dict(model: FlaxUNet2DModel, state_dict: Mapping[str, Any]) -> nnx.State:
    """diffusers-named state dict (PyTorch layout) -> an nnx.State for `model`, each leaf in the model's dtype.

    A missing or unexpected key, or a shape mismatch, raises ValueError naming the key.
    """
    state_dict = rename_legacy_keys(state_dict)
    target = nnx.state(model)
    flat = list(nnx.to_flat_state(target))
    expected = {_torch_name(path): (path, var) for path, var in flat}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        raise ValueError(f"state dict is missing {len(missing)} key(s) the model needs, e.g. {missing[:5]}")
    if unexpected:
        raise ValueError(f"state dict has {len(unexpected)} key(s) the model does not use, e.g. {unexpected[:5]}")
    new_leaves = []
    for name, (path, var) in expected.items():
        value = _from_torch_layout(str(path[-1]), np.asarray(state_dict[name]))
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(
                f"{name}: shape {tuple(np.asarray(state_dict[name]).shape)} in the state dict does not fit the "
                f"model's {tuple(_to_torch_layout(str(path[-1]), np.zeros(var.shape, np.int8)).shape)}"
            )
        new_leaves.append((path, var.replace(jnp.asarray(value, dtype=var.dtype))))
    return nnx.from_flat_state(new_leaves)


def _abstract_model(config: Mapping[str, Any], dtype, param_dtype) -> FlaxUNet2DModel:
    # eval_shape builds the module without materialising random weights we are about to overwrite.
    return nnx.eval_shape(
        lambda: FlaxUNet2DModel(**config, dtype=dtype, param_dtype=param_dtype, rngs=rngs_outside_traces(0))
    )


def unet_from_state_dict(
    config: Mapping[str, Any], state_dict: Mapping[str, Any], *, dtype=jnp.float32, param_dtype=jnp.float32
) -> FlaxUNet2DModel:
    """Build a FlaxUNet2DModel from a diffusers config dict and state dict."""
    model = _abstract_model(config, dtype, param_dtype)
    nnx.update(model, from_state_dict(model, state_dict))
    return model


def _resolve_unet_dir(path_or_repo_id: str, subfolder: str | None) -> str:
    """The folder (local path or URL) holding the UNet's config.json; a name that is neither is a Hub repo id."""
    if not storage.is_remote(path_or_repo_id) and not storage.isdir(path_or_repo_id):
        path_or_repo_id = _download(path_or_repo_id, subfolder)
    if subfolder:
        folder = storage.join(path_or_repo_id, subfolder)
    elif storage.isfile(storage.join(path_or_repo_id, "unet", "config.json")):
        folder = storage.join(path_or_repo_id, "unet")
    else:
        folder = path_or_repo_id
    if not storage.isfile(storage.join(folder, "config.json")):
        raise FileNotFoundError(
            f"no UNet config.json in {folder} (expected a pipeline folder with unet/ or a unet folder)"
        )
    return folder


def _download(repo_id: str, subfolder: str | None) -> str:
    from huggingface_hub import snapshot_download

    # A whole pipeline: its unet and its scheduler (how it was trained to be sampled), not other components.
    prefixes = [subfolder] if subfolder else ["unet", "scheduler", ""]
    patterns = [f"{p}/*" if p else "*.json" for p in prefixes] + [f"{WEIGHTS_NAME}*"]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:  # noqa: BLE001 -- offline, unknown repo, gated repo: one line, not a traceback forest
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder and could not be fetched from the Hub: {e}"
        ) from None


def _read_weights(folder: str, variant: str | None) -> dict[str, np.ndarray]:
    suffix = f".{variant}" if variant else ""
    st_file = storage.join(folder, f"{WEIGHTS_NAME}{suffix}.safetensors")
    bin_file = storage.join(folder, f"{WEIGHTS_NAME}{suffix}.bin")
    if storage.isfile(st_file):
        from safetensors.numpy import load

        data = storage.read_bytes(st_file)
        try:
            return load(data)
        except (TypeError, ValueError, KeyError):  # bf16 has no numpy dtype: safetensors.numpy fails (KeyError: BF16)
            return _load_safetensors_with_ml_dtypes(data)
    if storage.isfile(bin_file):
        try:
            import torch
        except ImportError:
            raise ImportError(
                f"{bin_file} is a PyTorch pickle; reading it needs torch (pip install torch), "
                "or convert it to safetensors first"
            ) from None
        sd = torch.load(io.BytesIO(storage.read_bytes(bin_file)), map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}
    raise FileNotFoundError(f"no {WEIGHTS_NAME}{suffix}.safetensors or .bin in {folder}")


def _load_safetensors_with_ml_dtypes(data: bytes) -> dict[str, np.ndarray]:
    """The file's tensors, bf16 ones as float32: its header read here and bf16 decoded with ml_dtypes
    (safetensors.numpy has no bf16, and safetensors.flax reads through it)."""
    import ml_dtypes

    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + size :]
    dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64}
    out = {}
    for name, info in header.items():
        if info["dtype"] not in dtypes:
            raise ValueError(f"{name}: safetensors dtype {info['dtype']} is not a weight dtype this loader reads")
        start, end = info["data_offsets"]
        value = np.frombuffer(body[start:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
        out[name] = value.astype(np.float32) if value.dtype == ml_dtypes.bfloat16 else value.copy()
    return out


def _read_unet_config(folder: str) -> dict[str, Any]:
    config = json.loads(storage.read_text(storage.join(folder, "config.json")))
    class_name = config.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise ValueError(f"{folder}/config.json describes a {class_name}, not a UNet2DModel")
    return config


def load_unet_config(path_or_repo_id: str, subfolder: str | None = None) -> dict[str, Any]:
    """The UNet2DModel config.json of a pipeline folder, a unet folder (local or a URL such as gs://…) or a Hub
    repo id (no weights read)."""
    return _read_unet_config(_resolve_unet_dir(str(path_or_repo_id), subfolder))


def load_scheduler_config(path_or_repo_id: str) -> dict[str, Any] | None:
    """`scheduler/scheduler_config.json` of a pipeline folder (local or a URL) or a Hub repo id (in a flat repo,
    `scheduler_config.json` beside the unet's config.json, as diffusers also reads it); None where there is none."""
    root = str(path_or_repo_id)
    if not storage.is_remote(root) and not storage.isdir(root):
        root = _download(root, None)
    for path in (storage.join(root, "scheduler", "scheduler_config.json"), storage.join(root, "scheduler_config.json")):
        if storage.isfile(path):
            return json.loads(storage.read_text(path))
    return None


def load_unet(
    path_or_repo_id: str,
    subfolder: str | None = None,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    variant: str | None = None,
) -> FlaxUNet2DModel:
    """A FlaxUNet2DModel with weights from a diffusers pipeline folder, a unet folder (local or a URL such as
    gs://…), or a Hub repo id."""
    folder = _resolve_unet_dir(str(path_or_repo_id), subfolder)
    config = _read_unet_config(folder)
    return unet_from_state_dict(config, _read_weights(folder, variant), dtype=dtype, param_dtype=param_dtype)


def _write_json(path: str, obj: Mapping[str, Any]) -> None:
    storage.write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_unet(out_dir: str, model: FlaxUNet2DModel, state: nnx.State | None = None) -> None:
    """Write `config.json` and `diffusion_pytorch_model.safetensors` (PyTorch layout) into `out_dir` (a local
    folder or a URL); each file whole or not at all, with the mode the umask gives."""
    from safetensors.numpy import save

    tensors = to_state_dict(model if state is None else state)
    # save() to bytes and our atomic write, not save_file: its own atomic write leaves the file mode 0600.
    storage.write_bytes(storage.join(out_dir, f"{WEIGHTS_NAME}.safetensors"), save(tensors, metadata={"format": "pt"}))
    _write_json(
        storage.join(out_dir, "config.json"),
        {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, **model.config},
    )


def save_pipeline(
    out_dir: str, model: FlaxUNet2DModel, scheduler: Any = None, *, state: nnx.State | None = None
) -> None:
    """Write a diffusers `DDPMPipeline` folder (model_index.json, unet/, scheduler/) loadable without us.

    `out_dir` is a local folder or a URL (gs://…). `state` overrides the model's own weights (e.g. EMA params);
    `scheduler` defaults to DDPM's defaults.
    """
    if scheduler is None:
        scheduler = FlaxDDPMScheduler.create()
    scheduler_config = scheduler.to_config()
    if model.config["sample_size"] is None:
        logger.warning("unet sample_size is None: DDPMPipeline needs it to pick the image size")
    save_unet(storage.join(out_dir, "unet"), model, state)
    _write_json(storage.join(out_dir, "scheduler", "scheduler_config.json"), scheduler_config)
    # model_index.json last: from_pretrained needs it, so a folder that has it has the rest.
    _write_json(
        storage.join(out_dir, "model_index.json"),
        {
            "_class_name": "DDPMPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", scheduler_config["_class_name"]],
            "unet": ["diffusers", "UNet2DModel"],
        },
    )
