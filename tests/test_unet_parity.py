"""FlaxUNet2DModel against diffusers' PyTorch UNet2DModel on random weights, both directions of conversion."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from flax import nnx

from uncond_flax.export import from_state_dict, load_unet, save_pipeline, save_unet, unet_from_state_dict
from uncond_flax.models import FlaxUNet2DModel
from uncond_flax.models.attention import Attention
from uncond_flax.models.layers import CONV_IMPLS, GroupNorm, implementations
from uncond_flax.models.resnet import ResnetBlock2D

from torch_reference import nchw, nhwc, randomized_torch_unet

SMALL = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)

CONFIGS = {
    # diffusers' train_unconditional.py model, at 32 px.
    "train_unconditional_default": dict(
        sample_size=32,
        layers_per_block=2,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    ),
    # google/ddpm-cifar10-32's layout, narrower.
    "ddpm_cifar10_style": dict(
        sample_size=16,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        norm_eps=1e-6,
        norm_num_groups=16,
    ),
    "scale_shift_fourier_headdim_none": dict(
        SMALL,
        sample_size=16,
        resnet_time_scale_shift="scale_shift",
        time_embedding_type="fourier",
        attention_head_dim=None,
    ),
    "resnet_up_down_padding0": dict(
        sample_size=16,
        block_out_channels=(32, 32, 64),
        # A DownBlock2D that downsamples: by a conv with diffusers' bottom/right padding, whatever downsample_type.
        down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"),
        downsample_type="resnet",
        upsample_type="resnet",
        downsample_padding=0,
        norm_num_groups=8,
        attention_head_dim=16,
    ),
    "no_mid_block_one_layer": dict(SMALL, sample_size=16, mid_block_type=None, layers_per_block=1),
    "three_layers_groups16_mish": dict(
        sample_size=16,
        block_out_channels=(32, 48),
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        layers_per_block=3,
        norm_num_groups=16,
        act_fn="mish",
        mid_block_scale_factor=1.41421356,
        attn_norm_num_groups=4,
        center_input_sample=True,
        time_embedding_dim=96,
        attention_head_dim=12,
    ),
    "scale_shift_mid_without_groupnorm": dict(SMALL, sample_size=8, resnet_time_scale_shift="scale_shift"),
    "learned_time_gelu_no_attention_grayscale": dict(
        SMALL,
        sample_size=(8, 16),
        in_channels=1,
        out_channels=2,
        time_embedding_type="learned",
        num_train_timesteps=1000,
        act_fn="gelu",
        add_attention=False,
        dropout=0.1,
    ),
    "class_embedding_timestep": dict(SMALL, sample_size=8, class_embed_type="timestep", act_fn="relu"),
    "class_embedding_table": dict(SMALL, sample_size=8, num_class_embeds=10),
    # Class labels added to the time embedding as given; block names with diffusers' legacy "UNetRes" prefix.
    "class_embedding_identity_unetres_names": dict(
        SMALL,
        sample_size=8,
        class_embed_type="identity",
        down_block_types=("UNetResDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UNetResUpBlock2D"),
    ),
}


def _inputs(config, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    size = config.get("sample_size", 16)
    h, w = (size, size) if isinstance(size, int) else size
    x = rng.standard_normal((batch, h, w, config.get("in_channels", 3))).astype(np.float32)
    if config.get("time_embedding_type") == "fourier":
        t = rng.uniform(0.01, 1.0, batch).astype(np.float32)  # log(t) inside
    else:
        t = rng.integers(0, 1000, batch).astype(np.int64)
    labels = None
    if config.get("class_embed_type") == "identity":  # one time-embedding-sized vector per sample
        width = config.get("time_embedding_dim") or 4 * config["block_out_channels"][0]
        labels = rng.standard_normal((batch, width)).astype(np.float32)
    elif config.get("class_embed_type") == "timestep":
        labels = rng.integers(0, 1000, batch)
    elif config.get("num_class_embeds"):
        labels = rng.integers(0, config["num_class_embeds"], batch)
    return x, t, labels


@nnx.jit
def _flax_out(model, x, t, labels=None):
    return model(x, t, labels)


def _ours(model, x, t, labels=None):
    return np.asarray(_flax_out(model, jnp.asarray(x), jnp.asarray(t), None if labels is None else jnp.asarray(labels)))


def _public(config):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}


def _torch_out(model, x, t, labels):
    with torch.no_grad():
        lab = None if labels is None else torch.from_numpy(labels)
        return nhwc(model(nchw(x), torch.from_numpy(t), class_labels=lab).sample)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers_both_ways(name, tmp_path):
    config = CONFIGS[name]
    torch_model = randomized_torch_unet(config)
    x, t, labels = _inputs(config)
    expected = _torch_out(torch_model, x, t, labels)

    torch_model.save_pretrained(tmp_path / "torch_unet")
    ours = load_unet(str(tmp_path / "torch_unet"))
    got = _ours(ours, x, t, labels)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

    save_unet(str(tmp_path / "flax_unet"), ours)
    reloaded = UNet2DModel.from_pretrained(str(tmp_path / "flax_unet")).eval()
    assert _public(reloaded.config) == _public(torch_model.config)
    # Against torch's own save/load round trip, bit for bit: a model loaded by from_pretrained can round differently
    # (~1e-5 here on one core) from the same weights built in memory, in torch alone.
    torch_reloaded = UNet2DModel.from_pretrained(str(tmp_path / "torch_unet")).eval()
    np.testing.assert_array_equal(_torch_out(reloaded, x, t, labels), _torch_out(torch_reloaded, x, t, labels))
    np.testing.assert_allclose(_torch_out(reloaded, x, t, labels), expected, atol=1e-4, rtol=0)


def test_config_exposes_every_diffusers_key_with_defaults():
    torch_model = UNet2DModel(**CONFIGS["no_mid_block_one_layer"])
    ours = nnx.eval_shape(lambda: FlaxUNet2DModel(**CONFIGS["no_mid_block_one_layer"]))
    reference = {k: v for k, v in torch_model.config.items() if not k.startswith("_")}
    ours_config = ours.config
    assert set(ours_config) == set(reference)
    for key, value in reference.items():
        assert ours_config[key] == (list(value) if isinstance(value, tuple) else value), key


def test_state_dict_key_errors_name_the_key():
    config = CONFIGS["resnet_up_down_padding0"]
    sd = {k: v.numpy() for k, v in UNet2DModel(**config).state_dict().items()}
    abstract = nnx.eval_shape(lambda: FlaxUNet2DModel(**config))
    from_state_dict(abstract, sd)  # every name and shape lines up

    missing = dict(sd)
    del missing["mid_block.attentions.0.to_k.weight"]
    with pytest.raises(ValueError, match=r"missing 1 key.*mid_block\.attentions\.0\.to_k\.weight"):
        from_state_dict(abstract, missing)
    with pytest.raises(ValueError, match=r"does not use.*conv_in\.extra"):
        from_state_dict(abstract, {**sd, "conv_in.extra": np.zeros(1)})
    bad_shape = {**sd, "conv_out.weight": np.zeros((3, 32, 1, 1), np.float32)}
    with pytest.raises(ValueError, match=r"conv_out\.weight: shape \(3, 32, 1, 1\).*\(3, 32, 3, 3\)"):
        from_state_dict(abstract, bad_shape)


def test_timestep_forms_scalar_python_and_batch():
    config = CONFIGS["no_mid_block_one_layer"]
    torch_model = randomized_torch_unet(config, seed=3)
    ours = unet_from_state_dict(config, {k: v.numpy() for k, v in torch_model.state_dict().items()})
    x, _, _ = _inputs(config, batch=3)
    with torch.no_grad():
        expected = nhwc(torch_model(nchw(x), 417).sample)
    for t in (417, jnp.asarray(417), jnp.asarray([417.0, 417.0, 417.0])):
        np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x), t)), expected, atol=1e-4, rtol=0)
    # 417.9 as a Python float is truncated to 417, as diffusers does with a Python number.
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x), 417.9)), expected, atol=1e-4, rtol=0)


def test_legacy_attention_key_names_load(tmp_path):
    config = CONFIGS["no_mid_block_one_layer"]
    torch_model = randomized_torch_unet(config, seed=5)
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    legacy = {}
    for k, v in sd.items():
        for new, old in (
            (".to_q.", ".query."),
            (".to_k.", ".key."),
            (".to_v.", ".value."),
            (".to_out.0.", ".proj_attn."),
        ):
            k = k.replace(new, old)
        legacy[k] = v
    assert any(".proj_attn." in k for k in legacy)
    ours = unet_from_state_dict(config, legacy)
    x, t, _ = _inputs(config)
    np.testing.assert_allclose(_ours(ours, x, t), _torch_out(torch_model, x, t, None), atol=1e-4, rtol=0)


def test_bin_weights_load(tmp_path):
    config = CONFIGS["no_mid_block_one_layer"]
    torch_model = randomized_torch_unet(config, seed=7)
    torch_model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").exists()
    ours = load_unet(str(tmp_path))
    x, t, _ = _inputs(config)
    np.testing.assert_allclose(_ours(ours, x, t), _torch_out(torch_model, x, t, None), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "dtype, variant", [(torch.bfloat16, None), (torch.float16, "fp16")], ids=["bf16", "fp16-variant"]
)
def test_half_precision_weights_load_as_float32(tmp_path, dtype, variant):
    # Hub pipelines ship bf16 weights (no numpy dtype: safetensors.numpy cannot read them) and fp16 ones, the latter
    # often as a variant file beside the float32 one (diffusion_pytorch_model.fp16.safetensors).
    config = CONFIGS["no_mid_block_one_layer"]
    torch_model = randomized_torch_unet(config, seed=19).to(dtype)
    torch_model.save_pretrained(tmp_path, variant=variant)
    ours = load_unet(str(tmp_path), variant=variant)
    assert {p.dtype for p in jax.tree.leaves(nnx.state(ours, nnx.Param))} == {jnp.dtype(jnp.float32)}
    x, t, _ = _inputs(config)
    np.testing.assert_allclose(_ours(ours, x, t), _torch_out(torch_model.float(), x, t, None), atol=1e-4, rtol=0)
    if variant:  # the variant's file only: no float32 weights to fall back on
        with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.safetensors or .bin"):
            load_unet(str(tmp_path))


def test_pipeline_folder_loads_in_diffusers_without_warnings(tmp_path):
    from diffusers import DDPMPipeline
    from diffusers.utils import logging as dlogging

    config = CONFIGS["no_mid_block_one_layer"]
    ours = FlaxUNet2DModel(**config)
    save_pipeline(str(tmp_path / "pipe"), ours)

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    dlogging.set_verbosity_warning()
    dlogging.get_logger("diffusers").addHandler(handler)
    try:
        pipe = DDPMPipeline.from_pretrained(str(tmp_path / "pipe"))
    finally:
        dlogging.get_logger("diffusers").removeHandler(handler)
    messages = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert not messages, messages
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    x, t, _ = _inputs(config)
    np.testing.assert_allclose(_torch_out(pipe.unet.eval(), x, t, None), _ours(ours, x, t), atol=1e-4, rtol=0)


def test_bfloat16_compute_keeps_float32_params():
    config = CONFIGS["three_layers_groups16_mish"]
    torch_model = randomized_torch_unet(config, seed=11)
    x, t, _ = _inputs(config)
    expected = _torch_out(torch_model, x, t, None)
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    bf16 = unet_from_state_dict(config, sd, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    out = _flax_out(bf16, jnp.asarray(x), jnp.asarray(t))
    assert out.dtype == jnp.bfloat16
    rel = np.abs(np.asarray(out, np.float32) - expected).max() / np.abs(expected).max()
    assert rel < 0.05, rel


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(down_block_types=("SkipDownBlock2D", "AttnDownBlock2D")), "down_block_types contains 'SkipDownBlock2D'"),
        (dict(up_block_types=("AttnSkipUpBlock2D", "UpBlock2D")), "up_block_types contains 'AttnSkipUpBlock2D'"),
        (dict(mid_block_type="UNetMidBlock2DCrossAttn"), "mid_block_type='UNetMidBlock2DCrossAttn'"),
        (dict(time_embedding_type="sinusoid"), "time_embedding_type='sinusoid'"),
        (
            dict(resnet_time_scale_shift="spatial"),
            "resnet_time_scale_shift='spatial' is not supported; choose one of 'default', 'scale_shift'.",
        ),
        (dict(downsample_type="fir"), "downsample_type='fir'"),
        (dict(act_fn="tanh"), "act_fn='tanh' is not supported; choose one of 'swish', 'silu', 'mish', 'gelu', 'relu'."),
        (dict(norm_num_groups=7), "norm_num_groups=7"),
        (dict(block_out_channels=(32, 64, 64)), "same length"),
        (dict(cross_attention_dim=768), "unknown UNet2DModel config keys ['cross_attention_dim']"),
        (dict(layers_per_block=0), "layers_per_block=0 must be >= 1"),
        (dict(time_embedding_type="learned"), "time_embedding_type='learned' needs num_train_timesteps"),
    ],
)
def test_bad_config_is_a_clear_error(override, message):
    with pytest.raises(ValueError) as err:
        nnx.eval_shape(lambda: FlaxUNet2DModel(**{**SMALL, **override}))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_load_unet_from_a_hub_repo_id(tmp_path, monkeypatch):
    import huggingface_hub

    config = CONFIGS["no_mid_block_one_layer"]
    torch_model = randomized_torch_unet(config, seed=13)
    torch_model.save_pretrained(tmp_path / "snapshot" / "unet")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ours = load_unet("someone/ddpm-model")
    assert calls[0][0] == "someone/ddpm-model" and "unet/*" in calls[0][1]
    x, t, _ = _inputs(config)
    np.testing.assert_allclose(_ours(ours, x, t), _torch_out(torch_model, x, t, None), atol=1e-4, rtol=0)

    def offline(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="'someone/other' is not a local folder and could not be fetched"):
        load_unet("someone/other")


@pytest.mark.parametrize(
    "conv, attention, norm, upsample",
    [("conv", "xla", "grouped", "nearest_conv"), ("matmul", "per_head", "fused", "phases")],
)
def test_compute_implementations_match_diffusers_forward_and_gradient(conv, attention, norm, upsample):
    # Stride-2 convs with diffusers' bottom/right padding, 1x1 shortcuts, attention over 64 and 16 tokens.
    config = CONFIGS["resnet_up_down_padding0"]
    torch_model = randomized_torch_unet(config, seed=17)
    x, t, _ = _inputs(config)
    probe = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    x_torch = nchw(x).requires_grad_(True)
    out_torch = torch_model(x_torch, torch.from_numpy(t)).sample
    (out_torch * nchw(probe)).sum().backward()

    with implementations(conv=conv, attention=attention, norm=norm, upsample=upsample):
        ours = unet_from_state_dict(config, {k: v.numpy() for k, v in torch_model.state_dict().items()})
    assert {a.impl for a in _attention_modules(ours)} == {attention}
    assert {m.impl for _, m in nnx.iter_graph(ours) if isinstance(m, GroupNorm)} == {norm}
    # This config upsamples in its resnets (upsample_type="resnet"; Upsample2D: tests/test_conv_impls.py).
    assert {m.upsample_impl for _, m in nnx.iter_graph(ours) if isinstance(m, ResnetBlock2D) and m.up} == {upsample}
    assert {c.conv_general_dilated for c in _conv_modules(ours)} == {CONV_IMPLS[conv]}

    @nnx.jit
    def out_and_input_grad(model, x):
        out, vjp = jax.vjp(lambda x: model(x, jnp.asarray(t)), x)
        return out, vjp(jnp.asarray(probe))[0]

    out, grad = out_and_input_grad(ours, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(out), nhwc(out_torch), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(grad), nhwc(x_torch.grad), atol=1e-4, rtol=0)


def test_unknown_compute_implementation_is_a_clear_error():
    for kind, name in (("conv", "winograd"), ("attention", "flash")):
        with pytest.raises(
            ValueError, match=f"implementations: {kind}='{name}' is not supported; choose one of 'auto',"
        ):
            implementations(**{kind: name}).__enter__()


def _attention_modules(model):
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, Attention)]


def _conv_modules(model):
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)]
