"""Down, mid and up blocks of UNet2DModel; names and channel bookkeeping follow diffusers' unet_2d_blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uncond_flax.models.attention import Attention
from uncond_flax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D


def _resnet(in_channels, out_channels, temb_channels, cfg, **extra) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels=in_channels,
        out_channels=out_channels,
        temb_channels=temb_channels,
        groups=cfg["resnet_groups"],
        eps=cfg["resnet_eps"],
        dropout=cfg["dropout"],
        non_linearity=cfg["resnet_act_fn"],
        time_embedding_norm=cfg["resnet_time_scale_shift"],
        dtype=cfg["dtype"],
        param_dtype=cfg["param_dtype"],
        rngs=cfg["rngs"],
        **extra,
    )


def _attention(channels: int, cfg, norm_num_groups: int | None, rescale_output_factor: float = 1.0) -> Attention:
    head_dim = cfg["attention_head_dim"]
    return Attention(
        channels,
        heads=channels // head_dim,
        dim_head=head_dim,
        norm_num_groups=norm_num_groups,
        eps=cfg["resnet_eps"],
        rescale_output_factor=rescale_output_factor,
        dtype=cfg["dtype"],
        param_dtype=cfg["param_dtype"],
        rngs=cfg["rngs"],
    )


class DownBlock2D(nnx.Module):
    """`num_layers` resnets, then (unless last) a conv Downsample2D. Ignores `downsample_type`, as diffusers does."""

    has_attention = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        *,
        num_layers: int,
        add_downsample: bool,
        downsample_padding: int,
        downsample_type: str = "conv",
        **cfg,
    ):
        self.resnets = nnx.List(
            [
                _resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels, cfg)
                for i in range(num_layers)
            ]
        )
        self.attentions = (
            nnx.List([_attention(out_channels, cfg, cfg["resnet_groups"]) for _ in range(num_layers)])
            if self.has_attention
            else None
        )
        if not add_downsample:
            downsample_type = None
        elif not self.has_attention:
            downsample_type = "conv"
        self.downsample_type = downsample_type
        if downsample_type == "conv":
            down = Downsample2D(
                out_channels, downsample_padding, dtype=cfg["dtype"], param_dtype=cfg["param_dtype"], rngs=cfg["rngs"]
            )
        elif downsample_type == "resnet":
            down = _resnet(out_channels, out_channels, temb_channels, cfg, down=True)
        self.downsamplers = nnx.List([down]) if downsample_type else None

    def __call__(self, x, temb, rngs=None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        skips = ()
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb, rngs)
            if self.attentions is not None:
                x = self.attentions[i](x)
            skips += (x,)
        if self.downsamplers is not None:
            down = self.downsamplers[0]
            x = down(x, temb, rngs) if self.downsample_type == "resnet" else down(x)
            skips += (x,)
        return x, skips


class AttnDownBlock2D(DownBlock2D):
    """DownBlock2D with an Attention after every resnet; downsamples by conv or by a `down=True` resnet."""

    has_attention = True


class UpBlock2D(nnx.Module):
    """`num_layers` resnets, each fed the concat of the running sample and one popped skip; then Upsample2D.

    Ignores `upsample_type` (always a conv upsampler), as diffusers does.
    """

    has_attention = False

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        *,
        num_layers: int,
        add_upsample: bool,
        upsample_type: str = "conv",
        **cfg,
    ):
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channel if i == 0 else out_channels
            resnets.append(_resnet(resnet_in + skip_channels, out_channels, temb_channels, cfg))
        self.resnets = nnx.List(resnets)
        self.attentions = (
            nnx.List([_attention(out_channels, cfg, cfg["resnet_groups"]) for _ in range(num_layers)])
            if self.has_attention
            else None
        )
        if not add_upsample:
            upsample_type = None
        elif not self.has_attention:
            upsample_type = "conv"
        self.upsample_type = upsample_type
        if upsample_type == "conv":
            up = Upsample2D(out_channels, dtype=cfg["dtype"], param_dtype=cfg["param_dtype"], rngs=cfg["rngs"])
        elif upsample_type == "resnet":
            up = _resnet(out_channels, out_channels, temb_channels, cfg, up=True)
        self.upsamplers = nnx.List([up]) if upsample_type else None

    def __call__(self, x, skips: tuple[jax.Array, ...], temb, rngs=None) -> jax.Array:
        for i, resnet in enumerate(self.resnets):
            x = jnp.concatenate([x, skips[-1]], axis=-1)
            skips = skips[:-1]
            x = resnet(x, temb, rngs)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.upsamplers is not None:
            up = self.upsamplers[0]
            x = up(x, temb, rngs) if self.upsample_type == "resnet" else up(x)
        return x


class AttnUpBlock2D(UpBlock2D):
    """UpBlock2D with an Attention after every resnet; upsamples by conv or by an `up=True` resnet."""

    has_attention = True


class UNetMidBlock2D(nnx.Module):
    """resnet, then (attention, resnet); resnets and attention share `output_scale_factor`."""

    def __init__(
        self,
        in_channels: int,
        temb_channels: int,
        *,
        output_scale_factor: float,
        add_attention: bool,
        attn_groups: int | None,
        **cfg,
    ):
        if attn_groups is None and cfg["resnet_time_scale_shift"] == "default":
            attn_groups = cfg["resnet_groups"]
        self.resnets = nnx.List(
            [
                _resnet(in_channels, in_channels, temb_channels, cfg, output_scale_factor=output_scale_factor)
                for _ in range(2)
            ]
        )
        self.attentions = (
            nnx.List([_attention(in_channels, cfg, attn_groups, rescale_output_factor=output_scale_factor)])
            if add_attention
            else None
        )

    def __call__(self, x, temb, rngs=None) -> jax.Array:
        x = self.resnets[0](x, temb, rngs)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x, temb, rngs)


DOWN_BLOCKS = {"DownBlock2D": DownBlock2D, "AttnDownBlock2D": AttnDownBlock2D}
UP_BLOCKS = {"UpBlock2D": UpBlock2D, "AttnUpBlock2D": AttnUpBlock2D}
