"""Our jitted sampler against diffusers' DDPMPipeline / DDIMPipeline on the same weights and noise."""

import jax
import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

from uncond_flax.export import unet_from_state_dict
from uncond_flax.parallel import make_mesh
from uncond_flax.sampling import sample_images
from uncond_flax.schedulers import FlaxDDIMScheduler, FlaxDDPMScheduler

from torch_reference import nhwc, randomized_torch_unet

CONFIG = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    layers_per_block=1,
)


def _models(seed=0):
    torch_unet = randomized_torch_unet(CONFIG, seed=seed)
    ours = unet_from_state_dict(CONFIG, {k: v.numpy() for k, v in torch_unet.state_dict().items()})
    return torch_unet, ours


def _draws(seed, shape, count):
    """The noise diffusers' pipelines draw from `torch.manual_seed(seed)`: first the image, then per step."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.randn(shape, generator=gen)
    return first, [torch.randn(shape, generator=gen) for _ in range(count)]


def test_ddpm_sampler_equals_diffusers_pipeline():
    torch_unet, ours = _models()
    torch_sched = DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_small")
    expected = DDPMPipeline(unet=torch_unet, scheduler=torch_sched)(
        batch_size=2, generator=torch.manual_seed(0), num_inference_steps=10, output_type="np"
    ).images

    # DDPM draws step noise only while t > 0: steps 0..8 of 10; the last step takes none.
    first, draws = _draws(0, (2, 3, 8, 8), 9)
    step_noise = np.stack([nhwc(d) for d in draws] + [np.zeros((2, 8, 8, 3), np.float32)])
    got = sample_images(
        ours,
        FlaxDDPMScheduler.from_config(dict(torch_sched.config)),
        batch_size=2,
        num_inference_steps=10,
        noise_BHWC=nhwc(first),
        step_noise_TBHWC=step_noise,
    )
    assert got.shape == expected.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert got.std() > 0.05  # a real image, not a clipped constant


def test_ddim_sampler_equals_diffusers_pipeline_eta_0_and_1():
    torch_unet, ours = _models(seed=1)
    torch_sched = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    ours_sched = FlaxDDIMScheduler.from_config(dict(torch_sched.config))
    for eta in (0.0, 1.0):
        expected = DDIMPipeline(unet=torch_unet, scheduler=torch_sched)(
            batch_size=2, generator=torch.manual_seed(3), eta=eta, num_inference_steps=6, output_type="np"
        ).images
        first, draws = _draws(3, (2, 3, 8, 8), 6 if eta > 0 else 0)
        step_noise = np.stack([nhwc(d) for d in draws]) if eta > 0 else np.zeros((6, 2, 8, 8, 3), np.float32)
        got = sample_images(
            ours,
            ours_sched,
            batch_size=2,
            num_inference_steps=6,
            eta=eta,
            noise_BHWC=nhwc(first),
            step_noise_TBHWC=step_noise,
        )
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0, err_msg=f"eta={eta}")


def test_images_do_not_depend_on_device_count():
    _, ours = _models(seed=2)
    sched = FlaxDDPMScheduler.create()
    key = jax.random.key(7)
    on_8 = sample_images(ours, sched, batch_size=3, num_inference_steps=4, key=key, mesh=make_mesh())
    on_1 = sample_images(
        ours, sched, batch_size=3, num_inference_steps=4, key=key, mesh=make_mesh(devices=jax.devices()[:1])
    )
    assert len(jax.devices()) == 8
    assert on_8.shape == (3, 8, 8, 3) and on_8.min() >= 0 and on_8.max() <= 1
    np.testing.assert_allclose(on_8, on_1, atol=1e-4, rtol=0)  # float32 reduction order; << 1/255
    other_seed = sample_images(ours, sched, batch_size=3, num_inference_steps=4, key=jax.random.key(8))
    assert np.abs(other_seed - on_8).max() > 0.1


def test_sample_cli_demo_writes_pipeline_and_grid(tmp_path):
    from PIL import Image

    from uncond_flax.sample import main

    out = tmp_path / "demo"
    assert main(["--demo", str(out), "--num_images", "4", "--num_inference_steps", "3"]) == 0
    grid = Image.open(out / "samples.png")
    assert grid.size == (70, 70)  # 2x2 tiles of 32 px, 2 px apart
    pipe = DDPMPipeline.from_pretrained(str(out))
    assert pipe.unet.config.sample_size == 32


def test_key_mode_draws_fresh_noise_at_every_step():
    """With a key, DDPM adds new noise at each step. A model that predicts v = 0 makes the images a fixed linear
    mix of x_T and the step noises, whose spread tells independent step noises from one noise repeated: the
    key's images must spread as those from independently drawn explicit noise do."""
    from typing import ClassVar

    import jax.numpy as jnp
    from flax import nnx

    class ZeroV(nnx.Module):
        config: ClassVar[dict] = {"sample_size": 16, "in_channels": 3}  # what sample_images reads of a UNet

        def __call__(self, x, t):
            return jnp.zeros_like(x)

    sched = FlaxDDPMScheduler.create(prediction_type="v_prediction", clip_sample=False)
    batch, steps = 8, 10
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal((batch, 16, 16, 3), dtype=np.float32)
    fresh = rng.standard_normal((steps, batch, 16, 16, 3), dtype=np.float32)
    kwargs = dict(batch_size=batch, num_inference_steps=steps)
    spread = {
        name: sample_images(ZeroV(), sched, noise_BHWC=x_T, step_noise_TBHWC=noise, **kwargs).std()
        for name, noise in (("fresh", fresh), ("repeated", np.repeat(fresh[:1], steps, axis=0)))
    }
    assert spread["repeated"] - spread["fresh"] > 0.05  # 0.43 against 0.31; sampling error ~0.003
    keyed = sample_images(ZeroV(), sched, key=jax.random.key(0), **kwargs).std()
    assert abs(keyed - spread["fresh"]) < 0.02, (keyed, spread)


def test_sampler_leaves_convolutions_to_xla_on_several_cores_and_to_ynnpack_on_one(monkeypatch):
    """sampler_compiler_options: with several CPUs the sampler's convolutions are XLA's own (YNNPACK splits each small
    convolution over every thread); with one, XLA's defaults, where YNNPACK's forward convolutions are the faster."""
    import pytest
    from flax import nnx

    from uncond_flax import sampling
    from uncond_flax.step import step_compiler_options

    from test_step import _convolutions_in_ynn_fusions

    if jax.default_backend() != "cpu" or step_compiler_options() is None:
        pytest.skip("XLA:CPU's YNNPACK options are not in this jaxlib")
    graphdef, state = nnx.split(_models()[1])  # 32 and 64 channels: YNNPACK leaves <= 16 channels to XLA anyway
    scheduler = FlaxDDPMScheduler.create().set_timesteps(2)
    key = np.asarray(jax.random.key_data(jax.random.key(0)))
    counts = {}
    for cpus in (1, 2):
        monkeypatch.setattr(sampling, "_usable_cpus", lambda: cpus)
        sampling._compiled_sampler.cache_clear()
        run = sampling._compiled_sampler(graphdef, make_mesh(devices=jax.devices()[:1]), 0.0, (4, 8, 8, 3), 4, False)
        lowered = run.lower(state, scheduler, key)
        counts[cpus] = _convolutions_in_ynn_fusions(lowered.compile().as_text())
    sampling._compiled_sampler.cache_clear()
    # The same program with YNNPACK's convolutions asked for: whether this XLA gives it any to take.
    with_ynn_convs = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
    _, control = _convolutions_in_ynn_fusions(lowered.compile(compiler_options=with_ynn_convs).as_text())
    if control == 0:
        pytest.skip("this XLA gives YNNPACK no float32 convolutions: nothing to tell apart")
    (_, ynn_one), (convs_two, ynn_two) = counts[1], counts[2]
    assert convs_two >= 6 and ynn_two == 0 and ynn_one >= 6, (counts, control)
