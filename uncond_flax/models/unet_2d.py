"""FlaxUNet2DModel: diffusers' UNet2DModel in flax.nnx, NHWC, built from the same config.json keys."""

from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from uncond_flax.errors import check_choice
from uncond_flax.models.embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps
from uncond_flax.models.layers import ACTIVATIONS, conv2d, group_norm
from uncond_flax.models.resnet import TIME_EMBEDDING_NORMS
from uncond_flax.models.unet_2d_blocks import DOWN_BLOCKS, UP_BLOCKS, UNetMidBlock2D

logger = logging.getLogger(__name__)

# Every init argument of diffusers.UNet2DModel with its default; config.json carries exactly these keys.
UNET2D_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}

_CHOICES = {
    "time_embedding_type": ("positional", "fourier", "learned"),
    "mid_block_type": ("UNetMidBlock2D", None),
    "downsample_type": ("conv", "resnet"),
    "upsample_type": ("conv", "resnet"),
    "resnet_time_scale_shift": TIME_EMBEDDING_NORMS,
    "act_fn": tuple(ACTIVATIONS),
    "class_embed_type": (None, "timestep", "identity"),
}


def _strip_unetres(block_type: str) -> str:
    # diffusers accepts the legacy "UNetRes" prefix for the same blocks.
    return block_type[len("UNetRes") :] if block_type.startswith("UNetRes") else block_type


def resolve_unet_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults filled in and every value checked; raises ValueError naming the offending key."""
    unknown = sorted(k for k in config if k not in UNET2D_DEFAULTS and not k.startswith("_"))
    if unknown:
        raise ValueError(f"unknown UNet2DModel config keys {unknown}; supported keys: {sorted(UNET2D_DEFAULTS)}")
    cfg = dict(UNET2D_DEFAULTS)
    cfg.update({k: v for k, v in config.items() if not k.startswith("_")})
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
        if isinstance(cfg[key], (str, int)):
            raise ValueError(f"{key} must be a sequence, got {cfg[key]!r}")
        cfg[key] = tuple(cfg[key])
    if isinstance(cfg["sample_size"], list):
        cfg["sample_size"] = tuple(cfg["sample_size"])

    for key, choices in _CHOICES.items():
        check_choice(key, cfg[key], choices)
    for key, supported in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        for block in cfg[key]:
            if _strip_unetres(block) not in supported:
                raise ValueError(f"{key} contains {block!r}, which is not supported; choose from {list(supported)}")
    n = len(cfg["block_out_channels"])
    if len(cfg["down_block_types"]) != n or len(cfg["up_block_types"]) != n:
        raise ValueError(
            f"down_block_types ({len(cfg['down_block_types'])}), up_block_types ({len(cfg['up_block_types'])}) "
            f"and block_out_channels ({n}) must have the same length"
        )
    if n < 1:
        raise ValueError("block_out_channels must not be empty")
    if cfg["layers_per_block"] < 1:
        raise ValueError(f"layers_per_block={cfg['layers_per_block']} must be >= 1")
    if cfg["norm_num_groups"] is None:
        raise ValueError("norm_num_groups=None is not supported (diffusers' resnets need a group count)")
    for ch in cfg["block_out_channels"]:
        if ch % cfg["norm_num_groups"]:
            raise ValueError(
                f"norm_num_groups={cfg['norm_num_groups']} must divide every block_out_channels entry, not {ch}"
            )
    if cfg["time_embedding_type"] == "learned" and not cfg["num_train_timesteps"]:
        raise ValueError("time_embedding_type='learned' needs num_train_timesteps")
    return cfg


def downsampling_factor(config: Mapping[str, Any]) -> int:
    """Total spatial reduction of the UNet (inputs must be a multiple of it)."""
    return 2 ** (len(config.get("block_out_channels", UNET2D_DEFAULTS["block_out_channels"])) - 1)


def _as_json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _to_batch(timesteps: Any, batch: int) -> jax.Array:
    if isinstance(timesteps, (int, float)) and not isinstance(timesteps, bool):
        # diffusers turns a Python number into a long tensor, truncating floats.
        timesteps = jnp.asarray([int(timesteps)], jnp.int32)
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim == 0:
        timesteps = timesteps[None]
    return jnp.broadcast_to(timesteps, (batch,))


class FlaxUNet2DModel(nnx.Module):
    """UNet2DModel with diffusers' module names; `model(sample_BHWC, timesteps)` returns the BHWC prediction.

    Parameters are `nnx.Param`s; the frozen Fourier projection (if any) is an `embeddings.Buffer`.
    """

    def __init__(self, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None, **config):
        cfg = resolve_unet_config(config)
        self._config = tuple((k, cfg[k]) for k in UNET2D_DEFAULTS)  # hashable: lives in the static graphdef
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.dtype = dtype
        self.gradient_checkpointing = False
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        channels = cfg["block_out_channels"]
        time_embed_dim = cfg["time_embedding_dim"] or channels[0] * 4
        head_dim = cfg["attention_head_dim"]

        self.conv_in = conv2d(cfg["in_channels"], channels[0], 3, padding=1, **kw)

        if cfg["time_embedding_type"] == "fourier":
            self.time_proj = GaussianFourierProjection(channels[0], scale=16, rngs=rngs)
            timestep_input_dim = 2 * channels[0]
        elif cfg["time_embedding_type"] == "positional":
            self.time_proj = Timesteps(channels[0], cfg["flip_sin_to_cos"], cfg["freq_shift"])
            timestep_input_dim = channels[0]
        else:
            self.time_proj = nnx.Embed(
                cfg["num_train_timesteps"], channels[0], embedding_init=nnx.initializers.normal(1.0), **kw
            )
            timestep_input_dim = channels[0]
        self.time_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim, **kw)

        if cfg["class_embed_type"] is None and cfg["num_class_embeds"] is not None:
            self.class_embedding = nnx.Embed(
                cfg["num_class_embeds"], time_embed_dim, embedding_init=nnx.initializers.normal(1.0), **kw
            )
        elif cfg["class_embed_type"] == "timestep":
            self.class_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim, **kw)
        else:
            self.class_embedding = None  # "identity" adds class_labels as they are

        block_cfg = dict(
            resnet_eps=cfg["norm_eps"],
            resnet_act_fn=cfg["act_fn"],
            resnet_groups=cfg["norm_num_groups"],
            resnet_time_scale_shift=cfg["resnet_time_scale_shift"],
            dropout=cfg["dropout"],
            **kw,
        )
        down_blocks = []
        out_ch = channels[0]
        for i, block_type in enumerate(cfg["down_block_types"]):
            in_ch, out_ch = out_ch, channels[i]
            block_cls = DOWN_BLOCKS[_strip_unetres(block_type)]
            down_blocks.append(
                block_cls(
                    in_ch,
                    out_ch,
                    time_embed_dim,
                    num_layers=cfg["layers_per_block"],
                    add_downsample=i < len(channels) - 1,
                    downsample_padding=cfg["downsample_padding"],
                    downsample_type=cfg["downsample_type"],
                    attention_head_dim=head_dim if head_dim is not None else out_ch,
                    **block_cfg,
                )
            )
        self.down_blocks = nnx.List(down_blocks)

        if cfg["mid_block_type"] is None:
            self.mid_block = None
        else:
            self.mid_block = UNetMidBlock2D(
                channels[-1],
                time_embed_dim,
                output_scale_factor=cfg["mid_block_scale_factor"],
                add_attention=cfg["add_attention"],
                attn_groups=cfg["attn_norm_num_groups"],
                attention_head_dim=head_dim if head_dim is not None else channels[-1],
                **block_cfg,
            )

        up_blocks = []
        reversed_channels = channels[::-1]
        out_ch = reversed_channels[0]
        for i, block_type in enumerate(cfg["up_block_types"]):
            prev_out, out_ch = out_ch, reversed_channels[i]
            in_ch = reversed_channels[min(i + 1, len(channels) - 1)]
            block_cls = UP_BLOCKS[_strip_unetres(block_type)]
            up_blocks.append(
                block_cls(
                    in_ch,
                    prev_out,
                    out_ch,
                    time_embed_dim,
                    num_layers=cfg["layers_per_block"] + 1,
                    add_upsample=i < len(channels) - 1,
                    upsample_type=cfg["upsample_type"],
                    attention_head_dim=head_dim if head_dim is not None else out_ch,
                    **block_cfg,
                )
            )
        self.up_blocks = nnx.List(up_blocks)

        self.conv_norm_out = group_norm(channels[0], cfg["norm_num_groups"], cfg["norm_eps"], **kw)
        self.conv_out = conv2d(channels[0], cfg["out_channels"], 3, padding=1, **kw)

    def enable_gradient_checkpointing(self) -> None:
        """As diffusers' `enable_gradient_checkpointing()`: the backward pass recomputes each down, mid and up
        block's activations from its input instead of keeping them (less memory, one more forward pass)."""
        self.gradient_checkpointing = True

    def _block(self, block: nnx.Module, *args: Any) -> Any:
        if self.gradient_checkpointing:
            return nnx.remat(lambda block, *args: block(*args))(block, *args)
        return block(*args)

    @property
    def config(self) -> dict[str, Any]:
        """The full diffusers UNet2DModel config (every key, defaults filled), JSON-ready."""
        return {k: _as_json(v) for k, v in self._config}

    def __call__(
        self,
        sample_BHWC: jax.Array,
        timesteps: jax.Array | int | float,
        class_labels: jax.Array | None = None,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Predict from a noisy NHWC sample at `timesteps` (scalar or (B,)). `rngs` enables dropout."""
        cfg = dict(self._config)
        x = jnp.asarray(sample_BHWC, self.dtype)
        if cfg["center_input_sample"]:
            x = 2 * x - 1.0
        t_B = _to_batch(timesteps, x.shape[0])

        t_emb = self.time_proj(t_B)  # float32 for positional and Fourier projections, whatever the compute dtype
        emb = self.time_embedding(t_emb.astype(self.dtype))

        if cfg["class_embed_type"] is not None or cfg["num_class_embeds"] is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when doing class conditioning")
            if cfg["class_embed_type"] == "timestep":
                class_emb = self.class_embedding(self.time_proj(jnp.asarray(class_labels)).astype(self.dtype))
            elif cfg["class_embed_type"] == "identity":
                class_emb = jnp.asarray(class_labels)
            else:
                class_emb = self.class_embedding(jnp.asarray(class_labels))
            emb = emb + class_emb.astype(self.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels given, but the model has no class embedding (set num_class_embeds)")

        x = self.conv_in(x)
        skips = (x,)
        for block in self.down_blocks:
            x, res = self._block(block, x, emb, rngs)
            skips += res

        if self.mid_block is not None:
            x = self._block(self.mid_block, x, emb, rngs)

        for block in self.up_blocks:
            n = len(block.resnets)
            x = self._block(block, x, skips[-n:], emb, rngs)
            skips = skips[:-n]

        x = self.conv_out(self.conv_norm_out(x, activation=jax.nn.silu))
        if cfg["time_embedding_type"] == "fourier":
            x = x / t_B.reshape(-1, 1, 1, 1).astype(x.dtype)
        return x
