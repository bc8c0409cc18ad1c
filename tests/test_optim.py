"""Parity of the LR schedules, clip + AdamW and fp16 loss scaling with diffusers / torch (the reference)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from diffusers.optimization import get_scheduler

from configs.default import get_config
from uncond_flax.finite import all_finite, select_tree
from uncond_flax.loss_scale import DynamicLossScale, NoLossScale, make_loss_scale
from uncond_flax.optim import (
    LR_SCHEDULES,
    clip_by_global_norm_like_torch,
    global_norm_like_torch,
    lr_schedule,
    lr_schedule_for,
    make_optimizer,
)

# (warmup, total): no warmup, short, warmup == total, warmup > total.
STEP_PAIRS = [(0, 10), (2, 6), (3, 17), (5, 5), (8, 4)]
# The reference loops step LambdaLR without (or, on skipped fp16 steps, instead of) an optimizer step on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")

SHAPES = {"a": (3, 4), "b": (5,), "c": (2, 3, 2), "d": ()}

# How far a schedule may be from diffusers' (exact, float64), as a fraction of the peak lr: what float32 rounding
# of the optax forms allows. u = 2**-24 is float32's unit roundoff. The cosine's argument pi * count / T is rounded
# three times (pi, the product, the quotient): at most 3 pi u of an angle <= pi, and (1 + cos) / 2 has slope <= 1/2,
# so <= 4.8 u; cos, the sum, the product with the lr and the lr's own rounding add <= 1 u each: under 9 u. The
# linear forms (warmup, linear, polynomial) stay under 5 u. Measured: 2.5 u. Absolute, not relative: near the end
# of a decay the lr is ~1e-8 of the peak, where relative float32 precision is gone and no longer matters to
# training. A wrong schedule is far outside it: a warmup off by one step moves the lr by peak / warmup (2e-3 of
# the peak at 500 steps).
LR_ATOL = 10 * 2.0**-24


def _torch_lrs(name: str, lr: float, warmup: int, total: int) -> np.ndarray:
    """``get_last_lr()`` after k = 0..total scheduler steps: the lr of update k, and after the last, the lr logged."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_scheduler(name, optimizer=opt, num_warmup_steps=warmup, num_training_steps=total)
    out = [sched.get_last_lr()[0]]
    for _ in range(total):
        try:
            sched.step()
        except ZeroDivisionError:
            # diffusers' polynomial divides by total - warmup == 0 at count == total; it would be lr_end one count
            # later (count > total), which is what ours logs after the last update.
            assert name == "polynomial" and warmup == total == len(out)
            return np.asarray(out + [1e-7], np.float64)
        out.append(sched.get_last_lr()[0])
    return np.asarray(out, np.float64)


def _ours(name, lr, warmup, total, counts) -> np.ndarray:
    sched = lr_schedule(name, lr, warmup, total)
    out = jax.jit(sched)(jnp.asarray(counts, jnp.int32))
    assert out.dtype == jnp.float32 and out.shape == np.shape(counts)
    return np.asarray(out, np.float64)


@pytest.mark.parametrize("name", LR_SCHEDULES)
@pytest.mark.parametrize("warmup,total", STEP_PAIRS)
def test_lr_schedule_matches_diffusers(name, warmup, total):
    lr = 1e-4
    ref = _torch_lrs(name, lr, warmup, total)
    np.testing.assert_allclose(_ours(name, lr, warmup, total, np.arange(total + 1)), ref, rtol=0, atol=LR_ATOL * lr)


@pytest.mark.parametrize("name", LR_SCHEDULES)
def test_lr_schedule_long_run(name):
    # 10k steps: float32 counts and angles near the end of the decay, where the lr goes to ~1e-8 of the peak.
    lr, warmup, total = 2e-3, 500, 10_000
    counts = np.arange(total + 1)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    lam = get_scheduler(name, optimizer=opt, num_warmup_steps=warmup, num_training_steps=total).lr_lambdas[0]
    ref = np.asarray([lr * lam(int(k)) for k in counts])
    np.testing.assert_allclose(_ours(name, lr, warmup, total, counts), ref, rtol=0, atol=LR_ATOL * lr)


def test_polynomial_depends_on_lr_init():
    # diffusers' polynomial lambda is (range * pct + lr_end) / lr_init, so the lr curve is not a scaled copy.
    for lr in (3e-3, 5e-7):
        ref = _torch_lrs("polynomial", lr, 2, 8)
        np.testing.assert_allclose(_ours("polynomial", lr, 2, 8, np.arange(9)), ref, rtol=0, atol=LR_ATOL * lr)
    with pytest.raises(ValueError, match="lr_end"):
        lr_schedule("polynomial", 1e-7, 0, 10)


def test_bad_scheduler_name():
    with pytest.raises(ValueError, match=r"lr_scheduler.*'cosine_annealing'.*constant_with_warmup"):
        lr_schedule("cosine_annealing", 1e-4, 0, 10)
    cfg = get_config()
    cfg.lr_scheduler = "nope"
    with pytest.raises(ValueError, match="lr_scheduler"):
        make_optimizer(cfg, 10)


def test_lr_schedule_for_reads_the_config():
    cfg = get_config()
    cfg.lr_warmup_steps = 4
    total = 20
    counts = jnp.arange(10)
    base = lr_schedule("cosine", cfg.learning_rate, 4, total)
    np.testing.assert_array_equal(lr_schedule_for(cfg, total)(counts), base(counts))


def _random_tree(rng: np.random.Generator, scale: float = 1.0) -> dict:
    return {k: np.asarray(scale * rng.standard_normal(s), np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("scale", [0.0, 1e-3, 3.0, 1e18])
def test_both_norm_reductions_give_torchs_total_norm(scale):
    rng = np.random.default_rng(2)
    grads = _random_tree(rng, scale)
    grads["bf16"] = jnp.asarray(scale * rng.standard_normal((7, 3)), jnp.bfloat16)  # summed in float32 either way
    params = [torch.nn.Parameter(torch.zeros(np.shape(g))) for g in grads.values()]
    for p, g in zip(params, grads.values()):
        p.grad = torch.from_numpy(np.array(g, np.float32))  # a copy: torch clips it in place
    total = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
    per_leaf = float(jax.jit(global_norm_like_torch)(grads))
    concat = float(jax.jit(lambda g: global_norm_like_torch(g, "concat"))(grads))
    np.testing.assert_allclose([per_leaf, concat], [total, total], rtol=1e-6, atol=0)
    for bad in (np.inf, np.nan):  # the step's finiteness check reads the norm
        poisoned = dict(grads, c=grads["c"].copy())
        poisoned["c"][0, 0, 0] = bad
        assert not np.isfinite(float(global_norm_like_torch(poisoned, "concat")))
    with pytest.raises(ValueError, match="grad_norm_reduction='flat' is not supported"):
        global_norm_like_torch(grads, "flat")


@pytest.mark.parametrize("scale", [0.0, 0.01, 0.1, 3.0])
def test_clip_matches_torch(scale):
    rng = np.random.default_rng(1)
    grads = _random_tree(rng, scale)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES.values()]
    for p, g in zip(params, grads.values()):
        p.grad = torch.from_numpy(g.copy())
    total = torch.nn.utils.clip_grad_norm_(params, 1.0)
    clip = clip_by_global_norm_like_torch(1.0)
    ours, _ = jax.jit(clip.update)(grads, clip.init(grads))
    for p, k in zip(params, SHAPES):
        np.testing.assert_allclose(np.asarray(ours[k]), p.grad.numpy(), rtol=1e-6, atol=0)
    # The scales straddle max_norm = 1 (total norm of 30 N(0, s^2) entries is ~5.5 s).
    assert (float(total) > 1.0) == (scale == 3.0)
    # Given the norm (the train step computes it once for its log too), the clip uses it as torch's total.
    given, _ = jax.jit(clip.update)(grads, clip.init(grads), global_norm=jnp.asarray(float(total), jnp.float32))
    for p, k in zip(params, SHAPES):
        np.testing.assert_allclose(np.asarray(given[k]), p.grad.numpy(), rtol=1e-6, atol=0)
    doubled = 2.0 * max(float(total), 1.0)  # twice the true norm (or max_norm): half of what torch's clip leaves
    halved, _ = clip.update(grads, clip.init(grads), global_norm=jnp.float32(doubled))
    for k in SHAPES:
        np.testing.assert_allclose(np.asarray(halved[k]), grads[k] * min(1.0, 1.0 / (doubled + 1e-6)), rtol=1e-6)


def test_clip_is_torchs_to_the_bit_where_the_norm_is_exact():
    # Leaf norms 5 and 12, total 13: float32 holds every norm exactly, so torch's coefficient
    # max_norm / (total + 1e-6), and at a total of exactly max_norm its slight shrink, must be reproduced bit for bit.
    base = {"a": np.array([3.0, 4.0], np.float32), "b": np.array([[0.0, 12.0]], np.float32)}
    clip = clip_by_global_norm_like_torch(1.0)
    for scale in (1.0, np.float32(1 / 13)):  # total norm 13, and 1.0 (its float32 rounding)
        grads = {k: v * np.float32(scale) for k, v in base.items()}
        params = [torch.nn.Parameter(torch.zeros(v.shape)) for v in grads.values()]
        for p, g in zip(params, grads.values()):
            p.grad = torch.from_numpy(g.copy())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        ours, _ = jax.jit(clip.update)(grads, clip.init(grads))
        for p, k in zip(params, grads):
            np.testing.assert_array_equal(np.asarray(ours[k]), p.grad.numpy(), err_msg=f"total norm {13 * scale}")
            assert not np.array_equal(np.asarray(ours[k]), grads[k])  # clipped, if only by 1e-6 at norm 1


def _config(**kw) -> ml_collections.ConfigDict:
    cfg = get_config()
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


SETTINGS = {
    # diffusers' defaults (lr 1e-4, betas (0.95, 0.999), wd 1e-6, eps 1e-8, cosine) with a short schedule.
    "defaults_cosine": _config(lr_warmup_steps=2),
    # Weight decay large enough to be visible, a different schedule, betas and eps.
    "linear_big_wd": _config(
        learning_rate=3e-3,
        lr_scheduler="linear",
        lr_warmup_steps=1,
        adam_beta1=0.9,
        adam_beta2=0.99,
        adam_weight_decay=0.05,
        adam_epsilon=1e-6,
    ),
}
GRAD_SCALES = [0.01, 5.0, 0.3, 10.0, 0.05, 2.0]  # clipping triggers on 5, 10 and 2 (norms ~27, ~55, ~11)


class _TorchRun:
    """train_unconditional.py's update: clip_grad_norm_(1.0), AdamW.step(), lr_scheduler.step()."""

    def __init__(self, cfg, init: dict, total: int):
        self.params = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in init.values()]
        self.opt = torch.optim.AdamW(
            self.params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
        self.sched = get_scheduler(
            cfg.lr_scheduler, optimizer=self.opt, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=total
        )

    def set_grads(self, grads: dict) -> None:
        for p, g in zip(self.params, grads.values()):
            p.grad = torch.from_numpy(np.array(g, np.float32))

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad()

    def numpy(self) -> dict:
        return {k: p.detach().numpy().copy() for k, p in zip(SHAPES, self.params)}


@pytest.mark.parametrize("setting", SETTINGS)
def test_optimizer_matches_torch_adamw(setting):
    cfg, total = SETTINGS[setting], 6
    rng = np.random.default_rng(0)
    init = _random_tree(rng)
    grads = [_random_tree(rng, s) for s in GRAD_SCALES]

    ref = _TorchRun(cfg, init, total)
    tx = make_optimizer(cfg, total)
    params = jax.tree_util.tree_map(jnp.asarray, init)
    opt_state = tx.init(params)

    @jax.jit
    def update(params, opt_state, g):
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for k, g in enumerate(grads):
        lr_used = float(lr_schedule_for(cfg, total)(k))
        assert math.isclose(lr_used, ref.sched.get_last_lr()[0], rel_tol=0, abs_tol=LR_ATOL * cfg.learning_rate)
        ref.set_grads(g)
        ref.step()
        params, opt_state = update(params, opt_state, g)
        want = ref.numpy()
        for key in SHAPES:
            got = np.asarray(params[key])
            np.testing.assert_allclose(got, want[key], rtol=1e-6, atol=1e-7, err_msg=f"update {k}, {key}")
            # The params move only ~lr per update: check the displacement too, to 1e-4 of itself plus the two
            # float32 roundings of the param it is read from.
            moved, want_moved = got - init[key], want[key] - init[key]
            slack = 1e-4 * np.abs(want_moved) + 2 * np.spacing(np.maximum(np.abs(got), np.abs(want[key])))
            assert np.all(np.abs(moved - want_moved) <= slack), (k, key, moved, want_moved)
    # Update 0 ran at lr 0 (warmup), exactly as torch: it only filled Adam's moments.
    assert float(lr_schedule_for(cfg, total)(0)) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Loss scaling


def test_loss_scale_growth_and_backoff():
    ls = DynamicLossScale.create(init_scale=8.0, growth_interval=3)
    update = jax.jit(lambda s, f: s.update(f))
    seen = []
    for finite in [True, True, True, True, False, True, True, True, True]:
        ls = update(ls, jnp.asarray(finite))
        seen.append((float(ls.scale), int(ls.good_steps)))
    assert seen == [(8, 1), (8, 2), (16, 0), (16, 1), (8, 0), (8, 1), (8, 2), (16, 0), (16, 1)]
    assert ls.scale.dtype == jnp.float32 and ls.good_steps.dtype == jnp.int32
    # Static hyperparameters; only scale and good_steps are leaves (what orbax checkpoints).
    assert len(jax.tree_util.tree_leaves(ls)) == 2 and ls.growth_interval == 3
    assert jax.tree_util.tree_leaves(NoLossScale()) == []


def test_loss_scale_inf_nan_and_roundtrip():
    ls = DynamicLossScale.create()
    assert float(ls.scale) == 2.0**16
    grads = _random_tree(np.random.default_rng(2))
    assert bool(all_finite(grads))
    for bad in (np.inf, -np.inf, np.nan):
        g = dict(grads, b=grads["b"].copy())
        g["b"][3] = bad
        assert not bool(all_finite(g))
        assert float(ls.update(all_finite(g)).scale) == 2.0**15
    # A power-of-two scale round-trips exactly; fp16 losses are scaled in float32 (2**16 overflows fp16).
    loss = jnp.asarray(1.2345, jnp.float16)
    assert ls.scale_loss(loss).dtype == jnp.float32
    assert float(ls.scale_loss(loss)) == float(loss) * 2.0**16
    back = ls.unscale(jax.tree_util.tree_map(lambda g: g * ls.scale, grads))
    for k in SHAPES:
        np.testing.assert_array_equal(np.asarray(back[k]), grads[k])
    half = ls.unscale({"h": jnp.asarray([2.0**15], jnp.float16)})["h"]
    assert half.dtype == jnp.float16 and float(half[0]) == 0.5
    # Growing past float32 max keeps the old scale, as GradScaler does.
    top = DynamicLossScale.create(init_scale=2.0**127, growth_interval=1).update(jnp.asarray(True))
    assert float(top.scale) == 2.0**127 and int(top.good_steps) == 0
    # The no-op scale for fp32 / bf16.
    none = make_loss_scale("no")
    assert isinstance(none, NoLossScale) and isinstance(make_loss_scale("bf16"), NoLossScale)
    assert isinstance(make_loss_scale("fp16"), DynamicLossScale)
    assert none.scale_loss(loss) is loss and none.unscale(grads) is grads and none.update(False) is none
    with pytest.raises(ValueError, match="mixed_precision"):
        make_loss_scale("fp8")


PATTERN = [1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1]


def test_fp16_step_matches_torch_gradscaler():
    """The documented fp16 step (scale, unscale, clip + AdamW, skip on overflow) against GradScaler + accelerate.

    accelerate skips lr_scheduler.step() when GradScaler skipped optimizer.step(); emulated here.
    """
    cfg, total = _config(lr_warmup_steps=2, learning_rate=1e-3), len(PATTERN)
    rng = np.random.default_rng(3)
    init = _random_tree(rng)
    grads = [_random_tree(rng, 0.5 + 3 * (k % 2)) for k in range(len(PATTERN))]

    ref = _TorchRun(cfg, init, total)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=3)
    tx = make_optimizer(cfg, total)
    params = jax.tree_util.tree_map(jnp.asarray, init)
    opt_state = tx.init(params)
    ls = DynamicLossScale.create(init_scale=2.0**4, growth_interval=3)

    @jax.jit
    def step(params, opt_state, ls, scaled_grads):
        grads = ls.unscale(scaled_grads)
        finite = jnp.isfinite(global_norm_like_torch(grads))  # the train step's check (uncond_flax.step)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        params, opt_state = select_tree(finite, (new_params, new_opt_state), (params, opt_state))
        return params, opt_state, ls.update(finite)

    for k, (ok, g) in enumerate(zip(PATTERN, grads)):
        if not ok:
            g = dict(g, a=np.full_like(g["a"], np.inf))
        assert float(ls.scale) == scaler.get_scale()
        scaled = {key: v * np.float32(scaler.get_scale()) for key, v in g.items()}

        scaler.scale(torch.zeros(()))  # lazily creates GradScaler's scale tensor
        ref.set_grads(scaled)
        scaler.unscale_(ref.opt)
        torch.nn.utils.clip_grad_norm_(ref.params, 1.0)
        scaler.step(ref.opt)
        scaler.update()
        if ok:
            ref.sched.step()
        ref.opt.zero_grad()

        params, opt_state, ls = step(params, opt_state, ls, scaled)
        assert (float(ls.scale), int(ls.good_steps)) == (scaler.get_scale(), int(scaler._growth_tracker)), k
        want = ref.numpy()
        for key in SHAPES:
            np.testing.assert_allclose(np.asarray(params[key]), want[key], rtol=1e-6, atol=1e-7, err_msg=str(k))
    # Skipped steps advanced neither Adam's count nor the schedule's.
    counts = [int(c) for _, c in optax.tree_utils.tree_get_all_with_path(opt_state, "count")]
    assert counts == [sum(PATTERN)] * 2  # Adam's and the lr schedule's
