"""Parity of the EMA decay and update with diffusers' EMAModel (the reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.training_utils import EMAModel

from uncond_flax.ema import ema_decay, ema_one_minus_decay, ema_step_update, ema_update, init_ema_params

SHAPES = {"w": (4, 3), "b": (3,), "s": ()}
# train_unconditional.py: EMAModel(params, decay=ema_max_decay, use_ema_warmup=True, inv_gamma, power).
SCRIPT = dict(decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
VARIANTS = {
    "script_defaults": SCRIPT,
    # max_decay 0.6 is reached at step 4, so the clamp is exercised within the run.
    "gamma_power_max": dict(decay=0.6, use_ema_warmup=True, inv_gamma=2.5, power=2 / 3),
    # The warmup's decay, 1 - 1 / (1 + step / 10), is under min_decay 0.3 for its first 4 steps (after
    # update_after_step): the lower clamp binds there.
    "min_decay_after_step": dict(
        decay=0.999, use_ema_warmup=True, inv_gamma=10.0, power=1.0, min_decay=0.3, update_after_step=3
    ),
    "no_warmup": dict(decay=0.95, use_ema_warmup=False, update_after_step=1),
}
LARGE_STEPS = [100, 1000, 10_000, 215_443, 10**6, 10**7]


def _ours_kwargs(v: dict) -> dict:
    return dict(
        max_decay=v["decay"],
        use_warmup=v["use_ema_warmup"],
        inv_gamma=v.get("inv_gamma", 1.0),
        power=v.get("power", 2 / 3),
        min_decay=v.get("min_decay", 0.0),
        update_after_step=v.get("update_after_step", 0),
    )


def _params(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {k: np.asarray(rng.standard_normal(s), np.float32) for k, s in SHAPES.items()}


def _torch_params(p: dict) -> list:
    return [torch.nn.Parameter(torch.from_numpy(np.array(v, np.float32))) for v in p.values()]


@pytest.mark.parametrize("variant", VARIANTS)
def test_decay_matches_diffusers(variant):
    v = VARIANTS[variant]
    ema = EMAModel(_torch_params(_params(0)), **v)
    steps = list(range(1, 51)) + LARGE_STEPS
    ref = []
    for s in steps:
        ema.optimization_step = s - 1  # step() increments, then computes get_decay
        ema.step(_torch_params(_params(0)))
        ref.append(ema.cur_decay_value)
    kw = _ours_kwargs(v)
    steps_arr = jnp.asarray(steps, jnp.int32)
    ours = jax.jit(jax.vmap(lambda s: ema_decay(s, **kw)))(steps_arr)
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours, np.float64), ref, rtol=1e-6, atol=1e-7)
    one_minus = jax.jit(lambda s: ema_one_minus_decay(s, **kw))(steps_arr)
    np.testing.assert_allclose(np.asarray(one_minus, np.float64), 1.0 - np.asarray(ref), rtol=2e-6, atol=0)
    assert float(ema_decay(1, **kw)) == 0.0 and float(ema_one_minus_decay(1, **kw)) == 1.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_shadow_params_match_diffusers(variant):
    v = VARIANTS[variant]
    kw = _ours_kwargs(v)
    params = _params(0)
    ref = EMAModel(_torch_params(params), **v)
    ours_step = init_ema_params(params)
    ours_literal = init_ema_params(params)
    step_fn = jax.jit(lambda e, p, s: ema_step_update(e, p, s, **kw))
    literal_fn = jax.jit(lambda e, p, s: ema_update(e, p, ema_decay(s, **kw)))
    ema_step = jnp.zeros((), jnp.int32)
    for k in range(12):
        params = {key: val + np.float32(0.3) * _params(100 + k)[key] for key, val in params.items()}
        ref.step(_torch_params(params))
        ema_step = ema_step + 1  # the documented convention: increment, then update with the new count
        ours_step, decay = step_fn(ours_step, params, ema_step)
        ours_literal = literal_fn(ours_literal, params, ema_step)
        assert float(decay) == pytest.approx(ref.cur_decay_value, rel=1e-6, abs=1e-7)
        for i, key in enumerate(SHAPES):
            want = ref.shadow_params[i].numpy()
            np.testing.assert_allclose(np.asarray(ours_step[key]), want, rtol=1e-6, atol=1e-6, err_msg=f"{k} {key}")
            np.testing.assert_allclose(np.asarray(ours_literal[key]), want, rtol=1e-6, atol=1e-6, err_msg=f"{k} {key}")
            assert ours_step[key].dtype == jnp.float32
        if k == 0 and v.get("update_after_step", 0) == 0:
            # Decay 0 on the first step: the EMA becomes the params.
            np.testing.assert_allclose(np.asarray(ours_step["w"]), params["w"], rtol=0, atol=1e-7)


def test_step_size_precision_near_max_decay():
    """Past the clamp (decay 0.9999) torch forms 1 - decay in float64; 1 - float32(decay) would be 1.7e-4 off."""
    steps = 10**7
    ema0, target = {"x": np.zeros(4, np.float32)}, {"x": np.ones(4, np.float32)}
    ref = EMAModel(_torch_params(ema0), **SCRIPT)
    ref.optimization_step = steps - 1
    ref.step(_torch_params(target))
    want = ref.shadow_params[0].numpy()  # == float32(1 - 0.9999) * 1
    ours, _ = ema_step_update(ema0, target, jnp.asarray(steps), **_ours_kwargs(SCRIPT))
    np.testing.assert_allclose(np.asarray(ours["x"]), want, rtol=1e-7, atol=0)
    assert float(ema_one_minus_decay(steps, **_ours_kwargs(SCRIPT))) == np.float32(1.0 - 0.9999)


def test_ema_update_dtypes_and_jit():
    ema = init_ema_params({"a": jnp.ones(3, jnp.bfloat16)})
    assert ema["a"].dtype == jnp.float32
    out = jax.jit(ema_update)(ema, {"a": jnp.zeros(3, jnp.bfloat16)}, jnp.float32(0.75))
    assert out["a"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out["a"]), 0.75)
