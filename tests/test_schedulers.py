"""Parity of the Flax DDPM/DDIM schedulers with diffusers' PyTorch schedulers (the reference)."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

from uncond_flax.schedulers import FlaxDDIMScheduler, FlaxDDPMScheduler, FlaxSchedulerOutput

NCHW = (2, 3, 8, 8)
CLIP_MODES = {
    "no_clip": dict(clip_sample=False),
    "clip": dict(clip_sample=True, clip_sample_range=0.8),
    # sample_max_value well above 1 so the quantile itself (not the clamp) sets the threshold.
    "threshold": dict(thresholding=True, sample_max_value=5.0),
}
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = (
    "fixed_small",
    "fixed_small_log",
    "fixed_large",
    "fixed_large_log",
    "learned",
    "learned_range",
)
SPACINGS = ("leading", "trailing", "linspace")


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def randn(seed: int, shape=NCHW, scale: float = 1.0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale)


# diffusers' float32 results are not the same on every CPU: torch built with MKL hands float32 sqrt (and `x ** 0.5`,
# which it turns into sqrt), exp and log to MKL's vector maths, which is within 1 ulp but not correctly rounded and
# picks its code path by CPU (AVX-512, AVX2 and the path MKL takes on AMD or with MKL_ENABLE_INSTRUCTIONS=SSE4_2
# each round some values differently). The schedules then cancel (1 - alpha_bar near 1; betas as 1 - a ratio),
# which turns that ulp into ~1e-5 absolute. So the reference runs diffusers' own code in float32 with each of these
# functions correctly rounded, as IEEE-754 specifies sqrt: worked in float64 and rounded once, which is exact for
# sqrt and differs from correct rounding of exp/log only in the rarest ties. That is the same on every CPU, and it
# is what our side computes (XLA's and numpy's float32 sqrt are correctly rounded), so parity stays at float32
# rounding. Checked with MKL_ENABLE_INSTRUCTIONS=SSE4_2/AVX/AVX2, ATEN_CPU_CAPABILITY=avx2/default and
# XLA_FLAGS=--xla_cpu_max_isa=AVX2/SSE4_2.
_ELEMENTARY = frozenset({"sqrt", "rsqrt", "pow", "__pow__", "__rpow__", "exp", "log", "sigmoid", "cos", "sin"})


class CorrectlyRoundedFloat32(torch.overrides.TorchFunctionMode):
    """Inside, torch's float32 elementary functions return the float32 rounding of their float64 value."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in _ELEMENTARY and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args
        ):
            wide = [a.double() if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a for a in args]
            return func(*wide, **kwargs).float()
        return func(*args, **kwargs)


@pytest.fixture(autouse=True)
def correctly_rounded_reference():
    """Every diffusers call in this module computes with correctly rounded elementary functions."""
    with CorrectlyRoundedFloat32():
        yield


def assert_parity(ours, ref: torch.Tensor, nchw: bool = True) -> None:
    """atol 1e-6 for O(1) values; rtol covers epsilon-prediction x_0 estimates of O(100) at large t."""
    expected = nhwc(ref) if nchw else ref.numpy()
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=2e-6, atol=1e-6)


def torch_noise(seed: int, shape=NCHW) -> torch.Tensor:
    # diffusers' randn_tensor with one CPU generator is exactly torch.randn(shape, generator=g).
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

TRAINED_BETAS = np.linspace(1e-4, 0.03, 100).tolist()


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize(
    "schedule_kwargs",
    [
        dict(beta_schedule="linear"),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(beta_schedule="sigmoid"),
        dict(beta_schedule="laplace"),
        dict(beta_schedule="linear", num_train_timesteps=777),
        dict(trained_betas=TRAINED_BETAS, num_train_timesteps=100),
    ],
    ids=["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "linear777", "trained"],
)
def test_ddpm_tables_match(schedule_kwargs, rescale):
    kwargs = dict(schedule_kwargs, rescale_betas_zero_snr=rescale)
    ours, ref = FlaxDDPMScheduler.create(**kwargs), DDPMScheduler(**kwargs)
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
    # torch.linspace's SIMD path (base + i * step per vector block) rounds some betas 1 ulp away from the scalar
    # formula we replay; zero-SNR betas near the end are 1 - a ratio of tiny alpha_bars and amplify that to a
    # few 1e-6. alphas_cumprod above still meets 1e-6, and the rescale itself is checked bit for bit below.
    table_tol = dict(rtol=0, atol=5e-6) if rescale else dict(rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), **table_tol)
    np.testing.assert_allclose(np.asarray(ours.alphas), ref.alphas.numpy(), **table_tol)
    assert ours.alphas_cumprod.dtype == jnp.float32
    if rescale:
        assert float(ours.alphas_cumprod[-1]) == 0.0
        # From the same float32 betas, diffusers' rescale (correctly rounded) and ours agree to the bit.
        plain_betas = np.array(FlaxDDPMScheduler.create(**schedule_kwargs).betas)
        np.testing.assert_array_equal(np.asarray(ours.betas), rescale_zero_terminal_snr(torch.from_numpy(plain_betas)))


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_ddim_tables_match(beta_schedule, set_alpha_to_one):
    kwargs = dict(beta_schedule=beta_schedule, set_alpha_to_one=set_alpha_to_one)
    ours, ref = FlaxDDIMScheduler.create(**kwargs), DDIMScheduler(**kwargs)
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(ours.final_alpha_cumprod), float(ref.final_alpha_cumprod), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Timesteps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize(
    "num_train, num_inference, offset",
    [(1000, 50, 0), (1000, 50, 1), (1000, 7, 1), (1000, 3, 0), (999, 10, 0), (1000, 1000, 0), (10, 10, 0)],
)
def test_set_timesteps_matches(spacing, num_train, num_inference, offset):
    kwargs = dict(num_train_timesteps=num_train, timestep_spacing=spacing, steps_offset=offset)
    for ours_cls, ref_cls in ((FlaxDDPMScheduler, DDPMScheduler), (FlaxDDIMScheduler, DDIMScheduler)):
        ours = ours_cls.create(**kwargs).set_timesteps(num_inference)
        ref = ref_cls(**kwargs)
        ref.set_timesteps(num_inference)
        assert ours.timesteps.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(ours.timesteps), ref.timesteps.numpy())
        assert ours.num_inference_steps == num_inference


def test_set_timesteps_returns_new_scheduler():
    original = FlaxDDPMScheduler.create()
    stepped = original.set_timesteps(10)
    assert stepped is not original
    assert original.num_inference_steps is None and original.timesteps.shape == (1000,)
    assert stepped.num_inference_steps == 10 and stepped.timesteps.shape == (10,)
    ddim = FlaxDDIMScheduler.create()
    assert ddim.set_timesteps(5).timesteps.shape == (5,) and ddim.num_inference_steps is None


@pytest.mark.parametrize("cls", [FlaxDDPMScheduler, FlaxDDIMScheduler])
def test_set_timesteps_rejects_bad_counts(cls):
    scheduler = cls.create(num_train_timesteps=100)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(101)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="steps_offset"):
        cls.create(num_train_timesteps=100, steps_offset=1).set_timesteps(100)


def test_ddpm_custom_timesteps():
    custom = [900, 700, 400, 150, 20, 0]
    ours = FlaxDDPMScheduler.create().set_timesteps(timesteps=custom)
    np.testing.assert_array_equal(np.asarray(ours.timesteps), custom)
    assert ours.custom_timesteps
    expected_prev = custom[1:] + [-1]
    assert [int(ours.previous_timestep(t)) for t in custom] == expected_prev
    for bad in ([5, 7, 3], [1000, 10], [10, 10]):
        with pytest.raises(ValueError, match="timesteps"):
            FlaxDDPMScheduler.create().set_timesteps(timesteps=bad)
    with pytest.raises(ValueError, match="exactly one"):
        FlaxDDPMScheduler.create().set_timesteps(10, timesteps=custom)


# ---------------------------------------------------------------------------------------------
# Forward process
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True)],
    ids=["linear", "cosine_zero_snr"],
)
def test_add_noise_and_velocity_match(kwargs):
    ours, ref = FlaxDDPMScheduler.create(**kwargs), DDPMScheduler(**kwargs)
    shape = (4, 3, 8, 8)
    x0, noise = randn(0, shape), randn(1, shape)
    t = torch.tensor([0, 1, 500, 999])
    args = (nhwc(x0), nhwc(noise), jnp.asarray(t.numpy()))
    assert_parity(ours.add_noise(*args), ref.add_noise(x0, noise, t))
    assert_parity(ours.get_velocity(*args), ref.get_velocity(x0, noise, t))
    # Any rank: per-batch factors broadcast over the trailing axes.
    flat = (x0.reshape(4, -1), noise.reshape(4, -1))
    assert_parity(ours.add_noise(flat[0].numpy(), flat[1].numpy(), t.numpy()), ref.add_noise(*flat, t), nchw=False)


def test_add_noise_under_jit_keeps_dtype():
    ours = FlaxDDIMScheduler.create()
    x0 = jnp.ones((2, 4, 4, 3), jnp.bfloat16)
    noisy = jax.jit(ours.add_noise)(x0, jnp.zeros_like(x0), jnp.array([10, 20]))
    assert noisy.dtype == jnp.bfloat16
    expected = np.sqrt(np.asarray(ours.alphas_cumprod)[[10, 20]])[:, None, None, None] * np.ones((2, 4, 4, 3))
    np.testing.assert_allclose(np.asarray(noisy, np.float32), expected, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# DDPM step
# ---------------------------------------------------------------------------------------------


def ddpm_model_output(variance_type: str, seed: int) -> torch.Tensor:
    prediction = randn(seed)
    if variance_type == "learned":
        # A variance, so positive (diffusers takes its sqrt).
        variance = torch.from_numpy(np.random.default_rng(seed + 1).uniform(1e-3, 2e-2, NCHW).astype(np.float32))
    elif variance_type == "learned_range":
        variance = torch.from_numpy(np.random.default_rng(seed + 1).uniform(-1, 1, NCHW).astype(np.float32))
    else:
        return prediction
    return torch.cat([prediction, variance], dim=1)


def run_ddpm_step_pair(ours, ref, timestep: int, seed: int):
    """One step of both schedulers with identical inputs and noise; returns (ours, reference)."""
    model_output = ddpm_model_output(ours.variance_type, seed)
    sample = randn(seed + 2, scale=1.5)
    ref_out = ref.step(model_output, timestep, sample, generator=torch.Generator().manual_seed(seed))
    noise = nhwc(torch_noise(seed))
    ours_out = ours.step(nhwc(model_output), timestep, nhwc(sample), variance_noise=noise)
    return ours_out, ref_out


@pytest.mark.parametrize("clip_mode", CLIP_MODES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
def test_ddpm_step_matches(variance_type, prediction_type, clip_mode):
    kwargs = dict(variance_type=variance_type, prediction_type=prediction_type, **CLIP_MODES[clip_mode])
    ours, ref = FlaxDDPMScheduler.create(**kwargs), DDPMScheduler(**kwargs)
    for timestep in (999, 400, 1, 0):
        ours_out, ref_out = run_ddpm_step_pair(ours, ref, timestep, seed=timestep)
        assert isinstance(ours_out, FlaxSchedulerOutput)
        assert_parity(ours_out.pred_original_sample, ref_out.pred_original_sample)
        if variance_type == "fixed_large_log" and timestep > 0:
            # diffusers takes sqrt(log(beta_t)) < 0 here: NaN, reproduced on purpose.
            assert np.isnan(np.asarray(ours_out.prev_sample)).all() and ref_out.prev_sample.isnan().all()
        else:
            assert_parity(ours_out.prev_sample, ref_out.prev_sample)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddpm_step_with_inference_timesteps_matches(spacing):
    # 7 steps over 1000: step ratios are uneven, so the previous timestep must come from the table.
    kwargs = dict(timestep_spacing=spacing, steps_offset=1, variance_type="fixed_large", clip_sample=False)
    ours = FlaxDDPMScheduler.create(**kwargs).set_timesteps(7)
    ref = DDPMScheduler(**kwargs)
    ref.set_timesteps(7)
    for i, timestep in enumerate(ref.timesteps.tolist()):
        ours_out, ref_out = run_ddpm_step_pair(ours, ref, timestep, seed=10 + i)
        assert int(ours.previous_timestep(timestep)) == int(ref.previous_timestep(timestep))
        assert_parity(ours_out.prev_sample, ref_out.prev_sample)
        assert_parity(ours_out.pred_original_sample, ref_out.pred_original_sample)


def test_ddpm_step_with_custom_timesteps_matches():
    custom = [950, 600, 333, 90, 4]
    ours = FlaxDDPMScheduler.create().set_timesteps(timesteps=custom)
    ref = DDPMScheduler()
    ref.set_timesteps(timesteps=custom)
    for i, timestep in enumerate(custom):
        ours_out, ref_out = run_ddpm_step_pair(ours, ref, timestep, seed=20 + i)
        assert_parity(ours_out.prev_sample, ref_out.prev_sample)


def test_ddpm_step_noise_sources():
    ours = FlaxDDPMScheduler.create()
    model_output, sample = jnp.ones((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 3))
    key = jax.random.key(3)
    from_key = ours.step(model_output, 50, sample, key=key).prev_sample
    explicit = ours.step(model_output, 50, sample, variance_noise=jax.random.normal(key, sample.shape)).prev_sample
    np.testing.assert_array_equal(np.asarray(from_key), np.asarray(explicit))
    # variance_noise wins over key.
    zero_noise = ours.step(model_output, 50, sample, key=key, variance_noise=jnp.zeros_like(sample)).prev_sample
    assert not np.allclose(np.asarray(zero_noise), np.asarray(from_key))
    # The last step (static t=0) is deterministic and needs no noise source.
    ours.step(model_output, 0, sample)
    with pytest.raises(ValueError, match="variance_noise"):
        ours.step(model_output, 50, sample)
    with pytest.raises(ValueError, match="variance_noise"):
        jax.jit(lambda t: ours.step(model_output, t, sample).prev_sample)(0)
    with pytest.raises(ValueError, match="channels"):
        FlaxDDPMScheduler.create(variance_type="learned").step(model_output, 0, sample)


def test_ddpm_step_keeps_sample_dtype():
    ours = FlaxDDPMScheduler.create()
    sample = jnp.ones((1, 4, 4, 3), jnp.bfloat16)
    out = ours.step(sample, 0, sample)
    assert out.prev_sample.dtype == jnp.bfloat16 and out.pred_original_sample.dtype == jnp.bfloat16


def test_ddpm_sampling_loop_under_jit_matches():
    """Traced timesteps inside jit + lax.scan give diffusers' numbers, incl. the branch-free t == 0 step."""
    kwargs = dict(variance_type="learned_range", thresholding=True, sample_max_value=5.0)
    ours = FlaxDDPMScheduler.create(**kwargs).set_timesteps(timesteps=[900, 500, 100, 0])
    ref = DDPMScheduler(**kwargs)
    ref.set_timesteps(timesteps=[900, 500, 100, 0])
    ref_sample, sample = randn(0), None
    model_outputs, noises = [], []
    for i, timestep in enumerate(ref.timesteps.tolist()):
        model_output = ddpm_model_output("learned_range", 100 + i)
        model_outputs.append(nhwc(model_output))
        noises.append(nhwc(torch_noise(i)))
        ref_sample = ref.step(
            model_output, timestep, ref_sample, generator=torch.Generator().manual_seed(i)
        ).prev_sample

    @jax.jit
    def sample_loop(scheduler, x, model_outputs, noises):
        def body(x, inputs):
            t, model_output, noise = inputs
            return scheduler.step(model_output, t, x, variance_noise=noise).prev_sample, None

        return jax.lax.scan(body, x, (scheduler.timesteps, model_outputs, noises))[0]

    sample = sample_loop(ours, nhwc(randn(0)), np.stack(model_outputs), np.stack(noises))
    assert_parity(sample, ref_sample)


# ---------------------------------------------------------------------------------------------
# DDIM step
# ---------------------------------------------------------------------------------------------


def run_ddim_step_pair(ours, ref, timestep: int, seed: int, **step_kwargs):
    model_output, sample, noise = randn(seed), randn(seed + 1, scale=1.5), torch_noise(seed)
    ref_out = ref.step(model_output, timestep, sample, variance_noise=noise, **step_kwargs)
    ours_out = ours.step(nhwc(model_output), timestep, nhwc(sample), variance_noise=nhwc(noise), **step_kwargs)
    return ours_out, ref_out


@pytest.mark.parametrize("use_clipped_model_output", [False, True])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip_mode", CLIP_MODES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_step_matches(prediction_type, clip_mode, eta, use_clipped_model_output):
    kwargs = dict(prediction_type=prediction_type, **CLIP_MODES[clip_mode])
    ours, ref = FlaxDDIMScheduler.create(**kwargs).set_timesteps(10), DDIMScheduler(**kwargs)
    ref.set_timesteps(10)
    for timestep in (900, 500, 0):
        ours_out, ref_out = run_ddim_step_pair(
            ours, ref, timestep, seed=timestep, eta=eta, use_clipped_model_output=use_clipped_model_output
        )
        assert_parity(ours_out.prev_sample, ref_out.prev_sample)
        assert_parity(ours_out.pred_original_sample, ref_out.pred_original_sample)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_full_schedule_matches(spacing, set_alpha_to_one, eta):
    # 7 steps over 1000 train steps: t - 1000 // 7 is not the next table entry for trailing/linspace.
    kwargs = dict(timestep_spacing=spacing, set_alpha_to_one=set_alpha_to_one, steps_offset=1, clip_sample=False)
    ours, ref = FlaxDDIMScheduler.create(**kwargs).set_timesteps(7), DDIMScheduler(**kwargs)
    ref.set_timesteps(7)
    for i, timestep in enumerate(ref.timesteps.tolist()):
        ours_out, ref_out = run_ddim_step_pair(ours, ref, timestep, seed=i, eta=eta)
        assert_parity(ours_out.prev_sample, ref_out.prev_sample)


def test_ddim_sampling_loop_under_jit_matches():
    kwargs = dict(prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=False)
    ours, ref = FlaxDDIMScheduler.create(**kwargs).set_timesteps(6), DDIMScheduler(**kwargs)
    ref.set_timesteps(6)
    ref_sample = randn(0)
    model_outputs, noises = [], []
    for i, timestep in enumerate(ref.timesteps.tolist()):
        model_output, noise = randn(50 + i), torch_noise(i)
        model_outputs.append(nhwc(model_output))
        noises.append(nhwc(noise))
        ref_sample = ref.step(model_output, timestep, ref_sample, eta=0.7, variance_noise=noise).prev_sample

    @jax.jit
    def sample_loop(scheduler, x, model_outputs, noises):
        def body(x, inputs):
            t, model_output, noise = inputs
            return scheduler.step(model_output, t, x, eta=0.7, variance_noise=noise).prev_sample, None

        return jax.lax.scan(body, x, (scheduler.timesteps, model_outputs, noises))[0]

    assert_parity(sample_loop(ours, nhwc(randn(0)), np.stack(model_outputs), np.stack(noises)), ref_sample)


def test_ddim_step_requirements():
    x = jnp.ones((1, 4, 4, 3))
    with pytest.raises(ValueError, match="set_timesteps"):
        FlaxDDIMScheduler.create().step(x, 10, x)
    ours = FlaxDDIMScheduler.create().set_timesteps(10)
    ours.step(x, 900, x)  # eta = 0: deterministic, no noise source needed
    with pytest.raises(ValueError, match="variance_noise"):
        ours.step(x, 900, x, eta=1.0)
    with_key = ours.step(x, 900, x, eta=1.0, key=jax.random.key(0)).prev_sample
    assert with_key.shape == x.shape and np.isfinite(np.asarray(with_key)).all()


# ---------------------------------------------------------------------------------------------
# Config I/O and validation
# ---------------------------------------------------------------------------------------------

DDPM_NON_DEFAULTS = dict(
    num_train_timesteps=100,
    beta_schedule="scaled_linear",
    trained_betas=TRAINED_BETAS,
    variance_type="learned_range",
    clip_sample=False,
    prediction_type="v_prediction",
    thresholding=True,
    dynamic_thresholding_ratio=0.9,
    clip_sample_range=2.0,
    sample_max_value=3.0,
    timestep_spacing="trailing",
    steps_offset=1,
    rescale_betas_zero_snr=True,
)
DDIM_NON_DEFAULTS = dict(
    num_train_timesteps=500,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="squaredcos_cap_v2",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="sample",
    timestep_spacing="linspace",
)


@pytest.mark.parametrize(
    "ours_cls, ref_cls, kwargs",
    [
        (FlaxDDPMScheduler, DDPMScheduler, {}),
        (FlaxDDPMScheduler, DDPMScheduler, DDPM_NON_DEFAULTS),
        (FlaxDDIMScheduler, DDIMScheduler, {}),
        (FlaxDDIMScheduler, DDIMScheduler, DDIM_NON_DEFAULTS),
    ],
)
def test_config_round_trips_through_diffusers(ours_cls, ref_cls, kwargs):
    ours = ours_cls.create(**kwargs)
    exported = json.loads(json.dumps(ours.to_config()))
    assert exported["_class_name"] == ref_cls.__name__ and isinstance(exported["_diffusers_version"], str)
    ref = ref_cls.from_config(exported)
    assert {k: ref.config[k] for k in ours.config} == ours.config
    assert {k: ref_cls(**kwargs).config[k] for k in ours.config} == ours.config
    assert ours_cls.from_config(dict(ref.config)).config == ours.config
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-6)


def test_from_config_ignores_metadata_and_warns_on_unknown_keys(caplog):
    ddim_config = FlaxDDIMScheduler.create(set_alpha_to_one=False, steps_offset=1).to_config()
    with caplog.at_level(logging.WARNING):
        ddpm = FlaxDDPMScheduler.from_config(ddim_config)
    assert ddpm.steps_offset == 1
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "set_alpha_to_one" in warnings and "_class_name" not in warnings and "_diffusers_version" not in warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ddim = FlaxDDIMScheduler.from_config(FlaxDDPMScheduler.create(variance_type="fixed_large").to_config())
    assert "variance_type" in caplog.text and ddim.set_alpha_to_one


def test_scheduler_is_a_pytree_with_static_config():
    ours = FlaxDDIMScheduler.create().set_timesteps(5)
    leaves, treedef = jax.tree_util.tree_flatten(ours)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves) and len(leaves) == 5
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.config == ours.config and rebuilt.num_inference_steps == 5


@pytest.mark.parametrize(
    "cls, key, value",
    [
        (FlaxDDPMScheduler, "beta_schedule", "foo"),
        (FlaxDDPMScheduler, "variance_type", "bar"),
        (FlaxDDPMScheduler, "prediction_type", "noise"),
        (FlaxDDPMScheduler, "timestep_spacing", "even"),
        (FlaxDDIMScheduler, "beta_schedule", "sigmoid"),
        (FlaxDDIMScheduler, "prediction_type", "x0"),
        (FlaxDDIMScheduler, "timestep_spacing", "uniform"),
        (FlaxDDPMScheduler, "num_train_timesteps", 0),
        (FlaxDDPMScheduler, "trained_betas", [0.1, 0.2]),
    ],
)
def test_bad_options_raise_value_error_naming_the_key(cls, key, value):
    with pytest.raises(ValueError, match=key) as error:
        cls.create(**{key: value})
    if key in ("beta_schedule", "variance_type", "prediction_type", "timestep_spacing"):
        assert repr(value) in str(error.value) and "choose one of" in str(error.value)
    with pytest.raises(ValueError, match=key):
        cls.from_config({key: value})


def test_fixed_large_log_warns(caplog):
    with caplog.at_level(logging.WARNING):
        FlaxDDPMScheduler.create(variance_type="fixed_large_log")
    assert "NaN" in caplog.text
