"""The train step's pieces against diffusers' script: the training losses, and dropout on in training only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from flax import nnx

from uncond_flax.config import resolve_config
from uncond_flax.optim import make_optimizer
from uncond_flax.parallel import make_mesh
from uncond_flax.schedulers import FlaxDDPMScheduler
from uncond_flax.step import diffusion_loss
from uncond_flax.train_state import build_model, train_state_layout

from test_train import build_step, run_steps, tiny_config
from torch_reference import nchw


def diffusers_loss(prediction_type, model_output, clean_images, noise, timesteps, noise_scheduler):
    """The loss of diffusers' train_unconditional.py (NCHW torch tensors), written out from its source.

    The script itself knows only epsilon and sample; for v_prediction the target is the scheduler's velocity,
    as in diffusers' other training scripts (train_text_to_image.py).
    """
    if prediction_type == "epsilon":
        return F.mse_loss(model_output.float(), noise.float())
    if prediction_type == "sample":
        # _extract_into_tensor(noise_scheduler.alphas_cumprod, timesteps, (bsz, 1, 1, 1))
        alpha_t = noise_scheduler.alphas_cumprod[timesteps].float()[:, None, None, None]
        snr_weights = alpha_t / (1 - alpha_t)
        return (snr_weights * F.mse_loss(model_output.float(), clean_images.float(), reduction="none")).mean()
    velocity = noise_scheduler.get_velocity(clean_images, noise, timesteps)
    return F.mse_loss(model_output.float(), velocity.float())


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_training_loss_matches_diffusers(prediction_type):
    rng = np.random.default_rng(0)
    shape = (6, 8, 8, 3)
    x0, noise, model_output = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    # Both ends of the schedule: the SNR weight runs from ~1e4 (t = 0) to ~4e-5 (t = 999).
    t_B = np.array([0, 1, 10, 500, 998, 999])
    scheduler = FlaxDDPMScheduler.create()
    ours = diffusion_loss(*map(jnp.asarray, (model_output, x0, noise, t_B)), scheduler, prediction_type)
    expected = diffusers_loss(
        prediction_type, nchw(model_output), nchw(x0), nchw(noise), torch.from_numpy(t_B), DDPMScheduler()
    )
    assert ours.dtype == jnp.float32
    # float32 means over 1152 terms, summed in another order by XLA and torch: a few ulps of difference.
    np.testing.assert_allclose(float(ours), float(expected), rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_images_are_scaled_to_minus_one_one_as_torchvision_does(dtype):
    from uncond_flax.step import normalize_images

    # Every uint8 value; for uint16 (preserve_input_precision) both ends and values between.
    top = np.iinfo(dtype).max
    values = np.unique(np.concatenate([np.arange(256), np.linspace(0, top, 1000).round(), [top - 1, top]]))
    images = values[values <= top].astype(dtype).reshape(1, -1, 1, 1, 1)
    # torchvision's ToTensor (uint8: .float().div(255)) / ConvertImageDtype (uint16: / iinfo.max), then
    # Normalize([0.5], [0.5]): (x - mean) / std, as diffusers' train_unconditional.py composes them.
    scaled = torch.from_numpy(images.astype(np.int64)).float() / float(torch.iinfo(torch.from_numpy(images).dtype).max)
    expected = ((scaled - 0.5) / 0.5).numpy()
    ours = normalize_images(jnp.asarray(images))
    assert ours.dtype == jnp.float32 and float(ours.min()) == -1.0 and float(ours.max()) == 1.0
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=0, atol=2e-7)


def test_dropout_draws_a_mask_per_key_in_training_and_is_off_at_inference(tmp_path):
    with_dropout = build_model(tiny_config(tmp_path, **{"model.dropout": 0.5}))
    without = build_model(tiny_config(tmp_path))
    for a, b in zip(jax.tree.leaves(nnx.state(with_dropout)), jax.tree.leaves(nnx.state(without)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # dropout has no weights: same init

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 1)), jnp.float32)
    t = jnp.array([10, 90])
    # Inference (previews, sampling, export) passes no rngs: dropout is the identity, as in torch's eval().
    reference = np.asarray(without(x, t))
    np.testing.assert_array_equal(np.asarray(with_dropout(x, t)), reference)

    def train_mode(seed):
        return np.asarray(with_dropout(x, t, rngs=nnx.Rngs(dropout=jax.random.key(seed))))

    first, again, other = train_mode(0), train_mode(0), train_mode(1)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - reference).max() > 1e-3 and np.abs(first - other).max() > 1e-3
    # Without dropout layers, rngs change nothing.
    np.testing.assert_array_equal(np.asarray(without(x, t, rngs=nnx.Rngs(dropout=jax.random.key(0)))), reference)


def test_train_step_applies_dropout(tmp_path):
    """Same weights, batch, noise and timesteps: only dropout can make the step's loss differ."""
    mesh = make_mesh(devices=jax.devices()[:1])
    _, plain = run_steps(tiny_config(tmp_path, train_batch_size=16), mesh, 1, with_metrics=True)
    _, dropped = run_steps(
        tiny_config(tmp_path, train_batch_size=16, **{"model.dropout": 0.5}), mesh, 1, with_metrics=True
    )
    assert abs(float(dropped[0]["loss"]) - float(plain[0]["loss"])) > 1e-4


def test_each_step_draws_its_own_noise_and_timesteps_from_seed_and_step_alone(tmp_path):
    """The same weights and images: the loss (computed before the update) moves only with the noise and timesteps,
    which must be new at every step, and the same again at the same step (what a resumed run relies on)."""
    state, step = build_step(resolve_config(tiny_config(tmp_path)), make_mesh(devices=jax.devices()[:1]))
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 16, 8, 8, 1), np.uint8))

    def loss_at(step_number):
        return float(step(state.replace(step=jnp.asarray(step_number, jnp.int32)), images)[1]["loss"])

    losses = [loss_at(n) for n in (0, 1, 2, 0)]
    assert losses[3] == losses[0] and len(set(losses[:3])) == 3, losses


def test_rng_streams_draw_what_nnx_rngs_draws_and_tracing_builds_no_tracer_error_messages(tmp_path, monkeypatch):
    """`rngs_outside_traces` (fresh weights, the train step's dropout) draws plain nnx.Rngs' keys, but traced
    (eval_shape, the jitted init, the step) it stages no key arithmetic and never builds JAX's "not available on a
    tracer" message, which walks the whole trace (flax asks a stream's count for `.sharding` at every draw)."""
    from jax._src.interpreters import partial_eval

    from uncond_flax.config import noise_scheduler_for
    from uncond_flax.models import FlaxUNet2DModel
    from uncond_flax.rng import purpose_key, rngs_outside_traces
    from uncond_flax.step import make_train_step
    from uncond_flax.train_state import _unet_kwargs

    config = resolve_config(tiny_config(tmp_path, **{"model.dropout": 0.5}))
    model = build_model(config)

    def plain():
        return FlaxUNet2DModel(**_unet_kwargs(config), rngs=nnx.Rngs(purpose_key(config.seed, "init")))

    ours, theirs = nnx.state(model, nnx.Param), nnx.state(plain(), nnx.Param)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def fold_ins(build):
        eqns = jax.make_jaxpr(lambda: nnx.state(build(), nnx.Param))().jaxpr.eqns
        return sum(eqn.primitive.name == "random_fold_in" for eqn in eqns)

    assert fold_ins(lambda: build_model(config)) == 0
    assert fold_ins(plain) >= 10  # the check sees staged draws

    x, t = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 1)), jnp.float32), jnp.array([10, 90])

    @jax.jit
    def masks(key):
        ours = model(x, t, rngs=rngs_outside_traces(key, stream="dropout"))
        return ours, model(x, t, rngs=nnx.Rngs(dropout=key))

    ours, theirs = masks(jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))

    messages = []
    original = partial_eval.DynamicJaxprTracer._origin_msg
    monkeypatch.setattr(
        partial_eval.DynamicJaxprTracer, "_origin_msg", lambda self: messages.append(1) or original(self)
    )
    tx = make_optimizer(config, 10)
    graphdef, _, abstract, _, _ = train_state_layout(config, make_mesh(), tx)
    step = make_train_step(
        graphdef, tx=tx, lr_fn=lambda s: 0.0, noise_scheduler=noise_scheduler_for(config), config=config
    )
    jax.make_jaxpr(step)(abstract, jax.ShapeDtypeStruct((1, 2, 8, 8, 1), jnp.uint8))
    assert messages == []
    jax.make_jaxpr(lambda k: model(x, t, rngs=nnx.Rngs(dropout=k)))(jax.random.key(0))
    assert messages  # the probe sees a plain stream's draws


def _probe_loss(graphdef, rest, x, t):
    """params -> mean squared output of the UNet `graphdef` on (x, t), dropout drawn from one fixed key."""

    def loss(params):
        return jnp.mean(nnx.merge(graphdef, params, rest)(x, t, rngs=nnx.Rngs(dropout=jax.random.key(3))) ** 2)

    return loss


def _residual_bytes(loss, params):
    """Bytes the forward pass of `loss` keeps for the backward pass (the vjp's residuals, weights included)."""
    residuals = jax.eval_shape(lambda p: jax.tree.leaves(jax.vjp(loss, p)[1]), params)
    return sum(r.size * r.dtype.itemsize for r in residuals)


def count_primitive(jaxpr, name):
    """How many times `name` runs in `jaxpr`, counting inside every sub-program (the printed form shows a repeated
    sub-program once)."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += count_primitive(inner, name)
    return count


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {  # two levels with attention, the Fourier time embedding (a buffer drawn at once, between batched draws)
            "model.block_out_channels": (16, 32),
            "model.down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
            "model.up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
            "model.time_embedding_type": "fourier",
            "use_ema": True,
        },
    ],
    ids=["tiny", "attention-fourier-ema"],
)
def test_the_init_program_draws_in_batches_the_weights_drawn_one_by_one(tmp_path, overrides):
    from uncond_flax.train_state import create_train_state

    config = resolve_config(tiny_config(tmp_path, **overrides))
    tx = make_optimizer(config, 10)
    _, _, state, _ = create_train_state(config, make_mesh(), tx)

    def one_by_one_init():
        return nnx.state(build_model(config), nnx.Param)

    one_by_one = build_model(config)  # eager: every initializer draws when it is called
    expected = nnx.split(one_by_one, nnx.Param, ...)[1:]
    for a, b in zip(jax.tree.leaves((state.params, state.buffers)), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if config.use_ema:
        for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(expected[0]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The program makes one vmapped draw per (initializer, shape) instead of one per weight.
    init = train_state_layout(config, make_mesh(), tx)[4]
    batched, single = (count_primitive(jax.make_jaxpr(f)().jaxpr, "random_bits") for f in (init, one_by_one_init))
    assert 0 < batched < single / 2, (batched, single)


def test_batched_draws_refuse_to_leave_a_placeholder_unfilled():
    from uncond_flax.models.layers import batched_draws, conv2d, linear

    with batched_draws() as draws:
        kept = linear(4, 3, rngs=nnx.Rngs(0))
        lost = conv2d(3, 3, 3, rngs=nnx.Rngs(1))  # its weights are not handed to fill()
    del lost
    with pytest.raises(RuntimeError, match="batched_draws: 2 draws are not leaves of the tree given to fill"):
        draws.fill(nnx.state(kept, nnx.Param))


def test_gradient_checkpointing_keeps_fewer_activations_and_gives_the_same_gradients(tmp_path):
    config = resolve_config(tiny_config(tmp_path, gradient_checkpointing=True, **{"model.dropout": 0.5}))
    train_graphdef, eval_graphdef, _, _, _ = train_state_layout(config, make_mesh(), make_optimizer(config, 10))
    model = build_model(config)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    # The train step's model recomputes; the float32 one that samples and exports does not.
    assert nnx.merge(train_graphdef, params, rest).gradient_checkpointing
    assert not nnx.merge(eval_graphdef, params, rest).gradient_checkpointing

    rng = np.random.default_rng(0)
    x, t = jnp.asarray(rng.standard_normal((16, 8, 8, 1)), jnp.float32), jnp.arange(16) * 60
    recomputing, storing = (_probe_loss(g, rest, x, t) for g in (train_graphdef, eval_graphdef))
    kept, plain = _residual_bytes(recomputing, params), _residual_bytes(storing, params)
    assert kept < 0.25 * plain, (kept, plain)  # measured: 0.7 MiB against 5.0

    recomputed, stored = (jax.jit(jax.grad(loss))(params) for loss in (recomputing, storing))
    # Dropout draws the same masks when a block runs again (a different mask would move gradients by ~1e-2).
    for a, b in zip(jax.tree.leaves(recomputed), jax.tree.leaves(stored), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def _convolutions_in_ynn_fusions(hlo_text: str) -> tuple[int, int]:
    """(convolutions in the program, those inside a YNNPACK fusion) in a compiled program's text."""
    import re

    bodies, name = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name = head.group(1)
            bodies[name] = 0
        elif name is not None:
            bodies[name] += " convolution(" in line
    in_ynn = 0
    for line in hlo_text.splitlines():
        call = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .* calls=%?([\w.\-]+)", line)
        if call and "ynn" in call.group(1):
            in_ynn += bodies.get(call.group(2), 0)
    return sum(bodies.values()), in_ynn


def test_train_step_compiles_convolutions_with_xla_not_ynnpack_on_cpu(tmp_path):
    """jit_train_step's compiler options keep convolutions out of YNNPACK (3x slower weight gradients there)."""
    from uncond_flax.config import noise_scheduler_for, resolve_config
    from uncond_flax.optim import lr_schedule_for, make_optimizer
    from uncond_flax.step import CPU_STEP_COMPILER_OPTIONS, jit_train_step, make_train_step, step_compiler_options
    from uncond_flax.step import step_seed
    from uncond_flax.train_state import train_state_layout

    if jax.default_backend() != "cpu" or step_compiler_options() is None:
        pytest.skip("XLA:CPU's YNNPACK options are not in this jaxlib")
    # 32 channels: YNNPACK leaves convolutions of <= 16 channels to XLA anyway. Batch 4 at 8 px: 256 output rows, above
    # layers.CONV_MATMUL_MAX_ROWS, so that the convolutions stay convolutions.
    overrides = {"model.block_out_channels": (32,), "model.norm_num_groups": 8, "train_batch_size": 4}
    config = resolve_config(tiny_config(tmp_path, **overrides))
    mesh, tx = make_mesh(devices=jax.devices()[:1]), make_optimizer(config, 10)
    graphdef, _, abstract, shardings, _ = train_state_layout(config, mesh, tx)
    step_fn = make_train_step(
        graphdef, tx=tx, lr_fn=lr_schedule_for(config, 10), noise_scheduler=noise_scheduler_for(config), config=config
    )
    jitted, images_sharding = jit_train_step(step_fn, shardings, mesh)
    batch = jax.ShapeDtypeStruct((1, config.train_batch_size, 8, 8, 1), "uint8", sharding=images_sharding)
    lowered = jitted.trace(jax.tree.leaves(abstract), batch, step_seed(config.seed, mesh)).lower()
    # The same program with YNNPACK's convolutions back on: the check below would see them.
    conv_type = "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    with_ynn_convs = {k: f"{v},{conv_type}" for k, v in CPU_STEP_COMPILER_OPTIONS.items()}
    _, control = _convolutions_in_ynn_fusions(lowered.compile(compiler_options=with_ynn_convs).as_text())
    if control == 0:
        pytest.skip("this XLA gives YNNPACK no float32 convolutions: nothing to keep out")
    convs, in_ynn = _convolutions_in_ynn_fusions(lowered.compile().as_text())
    assert convs >= 6 and in_ynn == 0 and control >= 6, (convs, in_ynn, control)


def test_the_jitted_step_takes_and_returns_the_states_leaves_and_its_seed_as_an_argument(tmp_path):
    # No flax Variable crosses the call (each would be flattened and rebuilt in Python, every step): a list of
    # arrays in, the same list out, and the same numbers as the step jitted on the TrainState with the config's
    # seed a constant of its program. The seed as an argument: the same draws, and one program for every seed.
    from uncond_flax.config import noise_scheduler_for
    from uncond_flax.optim import lr_schedule_for
    from uncond_flax.parallel import replicated
    from uncond_flax.step import jit_train_step, make_train_step, state_from_leaves, step_compiler_options, step_seed
    from uncond_flax.train_state import create_train_state

    config = resolve_config(tiny_config(tmp_path, use_ema=True, seed=7))
    mesh, tx = make_mesh(devices=jax.devices()[:1]), make_optimizer(config, 10)
    graphdef, _, state, shardings = create_train_state(config, mesh, tx)
    step_fn = make_train_step(
        graphdef, tx=tx, lr_fn=lr_schedule_for(config, 10), noise_scheduler=noise_scheduler_for(config), config=config
    )
    on_leaves, images_sharding = jit_train_step(step_fn, shardings, mesh)
    on_state = jax.jit(
        step_fn,
        in_shardings=(shardings, images_sharding),
        out_shardings=(shardings, replicated(mesh)),
        compiler_options=step_compiler_options(),
    )
    images = np.random.default_rng(0).integers(0, 256, (1, config.train_batch_size, 8, 8, 1), np.uint8)
    images = jax.device_put(images, images_sharding)
    leaves = jax.tree.leaves(jax.tree.map(jnp.copy, state))
    expected, expected_metrics = state, None
    other_seed = on_leaves(jax.tree.leaves(jax.tree.map(jnp.copy, state)), images, step_seed(8, mesh))[1]
    seed = step_seed(config.seed, mesh)
    for _ in range(2):
        expected, expected_metrics = on_state(expected, images)
        leaves, metrics = on_leaves(leaves, images, seed)
    assert on_leaves._cache_size() == 1  # both seeds: one program
    assert type(leaves) is list and jax.tree.structure(leaves) == jax.tree.structure([0] * len(leaves))
    assert len(leaves) == len(jax.tree.leaves(expected)) > 3 * len(jax.tree.leaves(expected.params))  # + Adam, EMA
    got = state_from_leaves(shardings, leaves)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert {k: float(v) for k, v in metrics.items()} == {k: float(v) for k, v in expected_metrics.items()}
    assert float(other_seed["loss"]) != float(metrics["loss"])  # another seed, other noise
    assert int(got.step) == 2 and float(metrics["loss"]) > 0


_CPUINFO = (
    "processor\t: {n}\nvendor_id\t: {vendor}\nmodel name\t: {model}\nflags\t\t: fpu sse2 avx avx2 fma {extra}\n\n"
)
_EPYC_ZEN5 = ("AuthenticAMD", "AMD EPYC 9B45", "avx512f avx512dq avx512bw avx512_bf16 avx512_vp2intersect")
_EPYC_ZEN3 = ("AuthenticAMD", "AMD EPYC 7B13", "sha_ni")
_XEON_SPR = ("GenuineIntel", "Intel(R) Xeon(R) Platinum 8481C", "avx512f avx512dq avx512bw amx_tile")


@pytest.mark.parametrize(
    "cpus, wide",
    [
        ([_EPYC_ZEN5, _EPYC_ZEN5], True),
        ([_EPYC_ZEN3, _EPYC_ZEN3], False),
        ([_XEON_SPR, _XEON_SPR], False),  # Intel: LLVM's 256-bit preference stays
        ([("AuthenticAMD", "AMD EPYC", "avx512_bf16 avx512vl")], False),  # AVX-512 flags but not the foundation
        ([_EPYC_ZEN3, _EPYC_ZEN5], False),  # the first processor's entry speaks for all
        ([], False),  # nothing to read
    ],
    ids=["zen5", "zen3", "sapphire-rapids", "no-avx512f", "first-entry", "empty"],
)
def test_wide_vectors_only_on_amd_cpus_with_avx512(tmp_path, cpus, wide):
    from uncond_flax.step import cpu_runs_wide_vectors_at_full_clock

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("".join(_CPUINFO.format(n=n, vendor=v, model=m, extra=e) for n, (v, m, e) in enumerate(cpus)))
    assert cpu_runs_wide_vectors_at_full_clock(str(cpuinfo)) is wide
    assert cpu_runs_wide_vectors_at_full_clock(str(tmp_path / "missing")) is False


@pytest.mark.parametrize("wide_cpu", [True, False])
@pytest.mark.parametrize("xla_flags", ["", "--xla_cpu_prefer_vector_width=256"])
def test_the_step_asks_for_512_bit_vectors_on_such_a_cpu_unless_xla_flags_set_a_width(monkeypatch, wide_cpu, xla_flags):
    from uncond_flax import step

    if jax.default_backend() != "cpu":
        pytest.skip("CPU options")
    monkeypatch.setattr(step, "cpu_runs_wide_vectors_at_full_clock", lambda: wide_cpu)
    monkeypatch.setenv("XLA_FLAGS", xla_flags)
    step.step_compiler_options.cache_clear()
    try:
        options = step.step_compiler_options()
    finally:
        step.step_compiler_options.cache_clear()
    if options is None:
        pytest.skip("XLA:CPU's YNNPACK options are not in this jaxlib")
    assert options.items() >= step.CPU_STEP_COMPILER_OPTIONS.items()
    assert (options.get("xla_cpu_prefer_vector_width") == "512") is (wide_cpu and not xla_flags), options
