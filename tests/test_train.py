"""The trainer on tiny configs: it learns, writes what diffusers' script writes, and parallelism changes nothing."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from uncond_flax.data import build_train_loader
from uncond_flax.optim import lr_schedule_for, make_optimizer
from uncond_flax.parallel import make_mesh
from uncond_flax.step import make_train_step
from uncond_flax.config import noise_scheduler_for, resolve_config
from uncond_flax.train import train_and_evaluate
from uncond_flax.train_state import create_train_state

from fixtures import tiny_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(tmp_path, **overrides):
    """tests/fixtures/tiny_digits.py with `output_dir` under tmp_path and dotted overrides."""
    c = tiny_digits.get_config()
    c.output_dir = str(tmp_path / "out")
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def read_metrics(config):
    path = os.path.join(config.output_dir, config.logging_dir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f]


def build_step(config, mesh, lr_fn=None):
    """(fresh TrainState, jitted train step) for a resolved `config` on `mesh`; `lr_fn` gives the logged lr (0)."""
    tx = make_optimizer(config, 100)
    graphdef, _, state, _ = create_train_state(config, mesh, tx)
    lr_fn = lr_fn or (lambda s: 0.0)
    step = jax.jit(
        make_train_step(graphdef, tx=tx, lr_fn=lr_fn, noise_scheduler=noise_scheduler_for(config), config=config)
    )
    return state, step


def run_steps(config, mesh, steps, state=None, with_metrics=False, lr_fn=None):
    """Train `steps` optimizer steps with the real loader and step on `mesh` (from `state` if given)."""
    config = resolve_config(config)
    with build_train_loader(config, mesh) as loader:
        fresh, step = build_step(config, mesh, lr_fn)
        state = fresh if state is None else state
        metrics = []
        for _ in range(steps):
            state, m = step(state, next(loader)["images"])
            metrics.append(m)
    return (state, metrics) if with_metrics else state


def test_training_lowers_the_loss_and_writes_diffusers_outputs(tmp_path, monkeypatch):
    calls = []
    from huggingface_hub import HfApi

    class _Repo:
        repo_id = "me/ddpm-digits"

    monkeypatch.setattr(
        HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)) or _Repo()
    )
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)))

    config = tiny_config(
        tmp_path,
        max_train_steps=30,
        use_ema=True,
        push_to_hub=True,
        hub_model_id="me/ddpm-digits",
        lr_scheduler="cosine",
        num_epochs=1,
        save_images_epochs=1,
        save_model_epochs=1,
    )
    state = train_and_evaluate(config)
    assert int(state.step) == 30 and int(state.skipped_steps) == 0

    metrics = read_metrics(config)
    losses = [m["loss"] for m in metrics]
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:5]), losses  # about 1.0 -> 0.6
    assert {"lr", "grad_norm", "ema_decay", "img/s", "skipped_steps"} <= set(metrics[0])

    out = config.output_dir
    assert os.path.isfile(os.path.join(out, "samples", "epoch_0000.png"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "logs")))
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(out)
    assert pipe.unet.config.sample_size == 8 and pipe.unet.config.in_channels == 1
    assert pipe.scheduler.config.num_train_timesteps == 100
    # The export holds the EMA weights, not the raw ones.
    exported = pipe.unet.state_dict()["conv_in.weight"].numpy()
    ema_conv_in = np.asarray(state.ema_params["conv_in"]["kernel"][...]).transpose(3, 2, 0, 1)
    raw_conv_in = np.asarray(state.params["conv_in"]["kernel"][...]).transpose(3, 2, 0, 1)
    np.testing.assert_array_equal(exported, ema_conv_in)
    assert np.abs(exported - raw_conv_in).max() > 1e-6

    # The logged lr is the one each update used, and ema_decay the decay it applied, as diffusers computes them.
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from test_optim import LR_ATOL  # float32 rounding of the schedule, as a fraction of the peak lr

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=config.learning_rate)
    sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=2, num_training_steps=30)
    ema = EMAModel([param], decay=config.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    for m in metrics:
        assert m["lr"] == pytest.approx(sched.get_last_lr()[0], rel=0, abs=LR_ATOL * config.learning_rate)
        ema.step([param])
        assert m["ema_decay"] == pytest.approx(ema.cur_decay_value, rel=1e-6, abs=1e-12)
        opt.step()
        sched.step()

    assert calls[0][:2] == ("create", "me/ddpm-digits")
    assert calls[1][0] == "upload" and calls[1][1]["folder_path"] == out and calls[1][1]["repo_id"] == "me/ddpm-digits"
    # What the Hub client sends of that folder (its own pattern filter): the pipeline and card, no sample grids or
    # checkpoints.
    from huggingface_hub.utils import filter_repo_objects

    upload = calls[1][1]
    local = [os.path.relpath(os.path.join(root, f), out) for root, _, files in os.walk(out) for f in files]
    sent = set(
        filter_repo_objects(
            local, allow_patterns=upload.get("allow_patterns"), ignore_patterns=upload.get("ignore_patterns")
        )
    )
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "README.md"} <= sent
    assert "samples/epoch_0000.png" in local
    assert not any(f.startswith(("samples/", "checkpoints/")) for f in sent), sorted(sent)
    assert os.path.isfile(os.path.join(out, "README.md"))


def assert_same_training(expected, other):
    """Two `run_steps(..., with_metrics=True)` results took the same steps: same losses, same gradients, same
    weights, up to the order of floating-point sums.

    The weights alone would not tell: clipping to norm 1 and Adam's division by sqrt(v) make them blind to a
    constant factor on the gradient (a sum where a mean belongs). So the pre-clipping gradient norm of every
    step and Adam's first moment (a running mean of the clipped gradients) are compared too.
    """
    (state_a, metrics_a), (state_b, metrics_b) = expected, other
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([float(m[key]) for m in metrics_b], [float(m[key]) for m in metrics_a], rtol=1e-5)
    mu_a, mu_b = (jax.tree.leaves(optax.tree_utils.tree_get(s.opt_state, "mu")) for s in (state_a, state_b))
    # Relative to the largest entry: some gradients (biases ahead of a GroupNorm) are 0 up to rounding.
    scale = max(np.abs(np.asarray(a)).max() for a in mu_a)
    for a, b in zip(mu_a, mu_b, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * scale)
    # Adam divides by sqrt(v), which can magnify rounding on near-zero gradients, so the weights are compared to
    # a small fraction of the updates' size (lr = 1e-3 per step).
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=3e-5)


def _tensorboard_events(folder):
    """The Event protos of the one tensorboard event file in `folder` (TFRecord: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    (name,) = [f for f in os.listdir(folder) if f.startswith("events.out.tfevents")]
    with open(os.path.join(folder, name), "rb") as f:
        data = f.read()
    events, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 8], "little")
        events.append(Event.FromString(data[pos + 12 : pos + 12 + length]))
        pos += 12 + length + 4
    return events


def test_tensorboard_gets_scalars_and_images_without_importing_torch(tmp_path):
    # tensorboardX imports torch whenever it is installed (here it is); the trainer's writer keeps it out.
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from uncond_flax.metrics import MetricWriter\n"
        "writer = MetricWriter('tensorboard', sys.argv[1], {})\n"
        "writer.scalars(3, {'loss': 0.25})\n"
        "writer.images(3, 'samples', np.full((2, 8, 6, 3), 0.5, np.float32))\n"
        "writer.close()\n"
        "print('torch' in sys.modules)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.split() == ["False"]
    values = [(e.step, v) for e in _tensorboard_events(tmp_path) for v in e.summary.value]
    assert [(step, v.tag, v.simple_value) for step, v in values if v.tag == "loss"] == [(3, "loss", 0.25)]
    images = [(step, v.image) for step, v in values if v.tag == "samples"]
    assert [(step, image.height, image.width) for step, image in images] == [(3, 8, 12)]  # a grid of the two


def test_step_clips_gradients_to_the_norm_it_logs(tmp_path):
    # After one step Adam's first moment is (1 - beta1) x the clipped gradients, whose norm torch's clip_grad_norm_
    # makes min(total norm, 1.0): the logged grad_norm must be the norm the clip used.
    config = tiny_config(tmp_path, adam_beta1=0.9)
    state, metrics = run_steps(config, make_mesh(), 1, with_metrics=True)
    mu = jax.tree.leaves(optax.tree_utils.tree_get(state.opt_state, "mu"))
    clipped_norm = np.sqrt(sum(float(np.sum(np.square(np.asarray(m, np.float64)))) for m in mu)) / (1 - 0.9)
    logged = float(metrics[0]["grad_norm"])
    assert logged > 1.0  # at init the tiny UNet's gradients are clipped: the check below depends on the norm used
    np.testing.assert_allclose(clipped_norm, min(logged, 1.0), rtol=1e-5)


def test_data_parallel_and_fsdp_equal_one_device(tmp_path):
    assert jax.device_count() == 8
    # Same global batch (16): 2 per device on 8 devices, 16 on one.
    on_8 = run_steps(tiny_config(tmp_path, train_batch_size=2), make_mesh(), 3, with_metrics=True)
    fsdp = run_steps(tiny_config(tmp_path, train_batch_size=2, fsdp=2), make_mesh(fsdp=2), 3, with_metrics=True)
    on_1 = run_steps(
        tiny_config(tmp_path, train_batch_size=16), make_mesh(devices=jax.devices()[:1]), 3, with_metrics=True
    )
    sharded = [p for p in jax.tree.leaves(fsdp[0].params) if not p.sharding.is_fully_replicated]
    assert sharded, "fsdp=2 should shard the larger weights"
    assert_same_training(on_1, on_8)
    assert_same_training(on_1, fsdp)


@pytest.mark.parametrize(
    "loop, per_device, accum, fsdp",
    [("unrolled", 4, 4, None), ("scan", 4, 4, None), ("scan", 1, 2, 2)],
    ids=["unrolled-4x4", "scan-4x4", "scan-2x8-fsdp"],
)
def test_accumulation_equals_one_batch_of_16(tmp_path, loop, per_device, accum, fsdp):
    # 16 images per step: one batch of 2 per device on 8 devices, or `accum` micro-batches (on 1 device, or all
    # 8 with params sharded fsdp-ways).
    mesh = make_mesh(fsdp=fsdp) if fsdp else make_mesh(devices=jax.devices()[:1])
    config = tiny_config(
        tmp_path,
        train_batch_size=per_device,
        gradient_accumulation_steps=accum,
        accumulation_loop=loop,
        fsdp=fsdp or 1,
    )
    with (
        build_train_loader(resolve_config(tiny_config(tmp_path, train_batch_size=2)), make_mesh()) as big,
        build_train_loader(resolve_config(config), mesh) as small,
    ):
        for _ in range(2):
            a, b = np.asarray(next(big)["images"]), np.asarray(next(small)["images"])
            assert a.shape == (1, 16, 8, 8, 1) and b.shape == (accum, 16 // accum, 8, 8, 1)
            np.testing.assert_array_equal(a.reshape(16, -1), b.reshape(16, -1))
    one_big = run_steps(
        tiny_config(tmp_path, train_batch_size=2, gradient_accumulation_steps=1), make_mesh(), 2, with_metrics=True
    )
    assert_same_training(one_big, run_steps(config, mesh, 2, with_metrics=True))


def test_concat_grad_norm_is_one_reduction_and_trains_the_same(tmp_path):
    runs, reductions = {}, {}
    for choice in ("per_leaf", "concat"):
        config = tiny_config(tmp_path, grad_norm_reduction=choice)
        state, step = build_step(resolve_config(config), make_mesh())
        jaxpr = str(jax.make_jaxpr(step)(state, jax.ShapeDtypeStruct((1, 16, 8, 8, 1), jnp.uint8)))
        reductions[choice] = jaxpr.count("reduce_sum[")
        leaves = len(jax.tree.leaves(state.params))
        runs[choice] = run_steps(config, make_mesh(), 2, with_metrics=True)
    # per_leaf: one sum per parameter and one over their norms; concat: one in all.
    assert reductions["per_leaf"] - reductions["concat"] == leaves > 20, reductions
    assert_same_training(runs["per_leaf"], runs["concat"])
    with pytest.raises(ValueError, match="grad_norm_reduction='flat' is not supported; choose one"):
        resolve_config(tiny_config(tmp_path, grad_norm_reduction="flat"))  # the config's check, before any trace


def test_scan_and_unrolled_accumulation_draw_the_same_dropout(tmp_path):
    mesh = make_mesh(devices=jax.devices()[:2])
    runs = [
        run_steps(
            tiny_config(tmp_path, gradient_accumulation_steps=2, accumulation_loop=loop, **{"model.dropout": 0.5}),
            mesh,
            2,
            with_metrics=True,
        )
        for loop in ("unrolled", "scan")
    ]
    assert_same_training(*runs)


@pytest.mark.parametrize("loop, loops_in_program", [("scan", 1), ("auto", 0)])  # auto on CPU: unrolled
def test_accumulation_loop_is_one_scan_or_unrolled(tmp_path, loop, loops_in_program):
    config = resolve_config(tiny_config(tmp_path, gradient_accumulation_steps=3, accumulation_loop=loop))
    mesh = make_mesh(fsdp=2)
    state, step = build_step(config, mesh)
    images = jax.ShapeDtypeStruct((3, 8 * config.train_batch_size, 8, 8, 1), jnp.uint8)
    jaxpr = jax.make_jaxpr(step)(state, images)
    # A loop over the 3 micro-batches holds the whole forward and backward pass, traced once (the attention's
    # own small loops are not it).
    loops = [
        e
        for e in jaxpr.eqns[0].params["jaxpr"].eqns
        if e.primitive.name == "scan" and e.params["length"] == 3 and len(e.params["jaxpr"].eqns) > 100
    ]
    assert len(loops) == loops_in_program


def layer_matmul_types(hlo_text):
    """For each convolution and unbatched matmul (dense layer, or a convolution XLA:CPU runs as one) of a lowered
    StableHLO program: the element types it multiplies. Attention's batched matmuls are left out, and so are
    GroupNorm's float32 statistics products (`layers.GROUP_MEANS`: precision HIGHEST, which no layer asks for)."""
    types = []
    for line in hlo_text.splitlines():
        layer = "stablehlo.convolution" in line or ("stablehlo.dot_general" in line and "batching_dims" not in line)
        if not layer or "precision = [HIGHEST, HIGHEST]" in line:
            continue
        # A dot may name its precision (bf16 inputs, f32 accumulation) while an operand is still f32.
        algorithm = re.search(r"lhs_precision_type = (\w+), rhs_precision_type = (\w+)", line)
        if algorithm:
            types.append(frozenset(algorithm.groups()))
        else:
            operands = line.rsplit(" : (", 1)[1].split(") ->")[0]
            types.append(frozenset(t.rsplit("x", 1)[-1] for t in re.findall(r"tensor<([^>]*)>", operands)))
    return types


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_float32_master_weights(tmp_path, precision):
    config = tiny_config(tmp_path, mixed_precision=precision)
    # The step computes in the 16-bit type: every convolution and dense layer, forward and backward, multiplies
    # 16-bit numbers. (Attention is left out: its softmax is float32 by design, as diffusers' upcast_softmax, and
    # XLA:CPU has no float16 matmul into float32, so there the fp16 attention block runs in float32.)
    state, step = build_step(resolve_config(config), make_mesh())
    images = jax.ShapeDtypeStruct((1, 16, 8, 8, 1), np.uint8)
    types = layer_matmul_types(step.lower(state, images).as_text())
    assert len(types) > 20 and set(types) == {frozenset({"bf16" if precision == "bf16" else "f16"})}, types
    state, metrics = run_steps(config, make_mesh(), 3, with_metrics=True)
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(state.params))
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(state.params))
    assert all(np.isfinite(float(m["loss"])) for m in metrics)
    if precision == "fp16":
        # GradScaler's schedule: 2**16 to start, halved on every overflow; finite steps are applied.
        scales = [float(m["loss_scale"]) for m in metrics]
        assert scales[0] == 2.0**16
        applied = 3 - int(state.skipped_steps)
        assert float(state.loss_scale.scale) == 2.0**16 * 0.5 ** int(state.skipped_steps) and applied >= 1
    else:
        assert int(state.skipped_steps) == 0


def test_fp16_gradients_are_unscaled_before_clipping_and_logging(tmp_path):
    # The loss is multiplied by 2**16 for the backward pass; the gradients the clip and the log see are divided back:
    # the same weights, batch and noise give the float32 step's grad_norm, up to fp16's rounding.
    grad_norms = {}
    for precision in ("no", "fp16"):
        _, metrics = run_steps(tiny_config(tmp_path, mixed_precision=precision), make_mesh(), 1, with_metrics=True)
        grad_norms[precision] = float(metrics[0]["grad_norm"])
    np.testing.assert_allclose(grad_norms["fp16"], grad_norms["no"], rtol=0.05)


def test_non_finite_step_changes_nothing_and_is_counted(tmp_path):
    config = tiny_config(tmp_path, train_batch_size=2)
    good = run_steps(config, make_mesh(), 1)
    kernel = good.params["conv_in"]["kernel"]
    poisoned = good.replace(params=jax.tree.map(lambda x: x, good.params))
    poisoned.params["conv_in"]["kernel"][...] = kernel[...].at[0, 0, 0, 0].set(np.inf)
    after = run_steps(config, make_mesh(), 2, state=poisoned)
    assert int(after.skipped_steps) == 2 and int(after.consecutive_skips) == 2 and int(after.step) == 3
    for a, b in zip(jax.tree.leaves(poisoned.params), jax.tree.leaves(after.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A finite step after them: counted as applied, and the run of skips (what max_consecutive_skips limits) ends.
    # Its logged lr is the one its update used: the schedule counts applied updates only (accelerate skips
    # lr_scheduler.step() with a skipped optimizer step), so one update in, not three (warmup of 2: 5e-4, not 1e-3).
    healed = after.replace(params=jax.tree.map(lambda x: x, after.params))
    healed.params["conv_in"]["kernel"][...] = kernel[...]
    lr_fn = lr_schedule_for(resolve_config(config), 100)
    again, metrics = run_steps(config, make_mesh(), 1, state=healed, with_metrics=True, lr_fn=lr_fn)
    assert int(again.skipped_steps) == 2 and int(again.consecutive_skips) == 0 and int(again.step) == 4
    assert float(metrics[0]["lr"]) == float(lr_fn(1)) == pytest.approx(5e-4)


def test_a_finite_loss_with_overflowing_gradients_is_skipped(tmp_path):
    # GradScaler's case: the loss is finite, its fp16 backward pass overflows. With a loss scale of 2**100 every
    # 16-bit gradient is inf (the loss, scaled in float32, is not); the step must see it and back off.
    config = tiny_config(tmp_path, mixed_precision="fp16", train_batch_size=2)
    good = run_steps(config, make_mesh(), 1)
    huge = good.replace(loss_scale=good.loss_scale.replace(scale=jnp.asarray(2.0**100, jnp.float32)))
    after, metrics = run_steps(config, make_mesh(), 1, state=huge, with_metrics=True)
    assert np.isfinite(float(metrics[0]["loss"])) and not np.isfinite(float(metrics[0]["grad_norm"]))
    assert int(after.skipped_steps) == int(good.skipped_steps) + 1 and float(after.loss_scale.scale) == 2.0**99
    for a, b in zip(jax.tree.leaves((huge.params, huge.opt_state)), jax.tree.leaves((after.params, after.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_consecutive_non_finite_steps_stop_the_run():
    from uncond_flax.metrics import NonFiniteStop, StepLogger

    class Writer:
        def scalars(self, step, values):
            self.last = (step, values)

    writer = Writer()
    log = StepLogger(
        writer, images_per_step=16, total_steps=10, every=1, max_consecutive_skips=3, use_ema=False, interactive=False
    )
    nan_metrics = dict(loss=np.nan, lr=0.0, ema_decay=0.0, grad_norm=np.nan)
    for step, consecutive in enumerate([1, 2, 0, 1, 2], start=1):
        log.push(step, dict(nan_metrics, skipped_steps=step, consecutive_skips=consecutive))
    assert writer.last[0] == 5 and "ema_decay" not in writer.last[1]
    with pytest.raises(NonFiniteStop, match="3 consecutive steps had a non-finite loss"):
        log.push(6, dict(nan_metrics, skipped_steps=6, consecutive_skips=3))


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(mixed_precision="fp8"), "mixed_precision='fp8'"),
        (dict(lr_scheduler="warmup_stable_decay"), "lr_scheduler='warmup_stable_decay' is not supported; choose one"),
        (dict(prediction_type="x0"), "prediction_type='x0'"),
        (dict(logger="mlflow"), "logger='mlflow'"),
        (dict(sample_scheduler="dpm"), "sample_scheduler='dpm'"),
        (dict(ddpm_beta_schedule="quadratic"), "beta_schedule"),
        (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps=0"),
        (dict(accumulation_loop="while"), "accumulation_loop='while' is not supported; choose one"),
        (
            dict(
                resolution=9,
                **{
                    "model.block_out_channels": (16, 32),
                    "model.down_block_types": ("DownBlock2D",) * 2,
                    "model.up_block_types": ("UpBlock2D",) * 2,
                },
            ),
            "resolution 9 is not divisible",
        ),
        (dict(**{"model.down_block_types": ("SkipDownBlock2D",)}), "SkipDownBlock2D"),
        (dict(fsdp=3), "fsdp=3"),
        (dict(checkpointing_steps=-5), "checkpointing_steps=-5 must be an integer >= 0"),
        (dict(max_consecutive_skips=0), "max_consecutive_skips=0 must be an integer >= 1"),
        (dict(log_every=0), "log_every=0"),
        (dict(**{"model.num_class_embeds": 10}), "model.num_class_embeds=10 makes a class-conditional UNet"),
        (dict(**{"model.class_embed_type": "timestep"}), "model.class_embed_type='timestep'"),
    ],
)
def test_bad_config_fails_before_compiling(tmp_path, override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train_and_evaluate(tiny_config(tmp_path, **override))
    assert not os.path.exists(os.path.join(tmp_path, "out", "unet"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.learning_rat=1e-3"], "--config.learning_rat: no such field; did you mean --config.learning_rate?"),
        (["--config.model.nope=1"], "--config.model.nope: no such field; --help lists every field with its value"),
        (["--config.resolution=9"], "resolution 9 is not divisible by the UNet's downsampling factor 2"),
    ],
)
def test_command_line_errors_are_one_line(args, message):
    result = subprocess.run(
        [sys.executable, "train_flax.py", "--config=configs/digits.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train_flax.py: error:") and message in last, result.stderr


def test_init_from_and_model_config_name_or_path_use_a_diffusers_unet(tmp_path):
    from diffusers import UNet2DModel
    from flax import nnx

    from uncond_flax.export import load_unet

    unet_config = {k: v for k, v in resolve_config(tiny_config(tmp_path)).model.to_dict().items()}
    unet_config["block_out_channels"] = [8]  # differs from the config file's model: the folder must win
    unet_config["norm_num_groups"] = 4
    unet_config["attention_head_dim"] = 8
    torch_unet = UNet2DModel(**unet_config)
    torch_unet.save_pretrained(tmp_path / "pretrained" / "unet")

    config = resolve_config(tiny_config(tmp_path, init_from=str(tmp_path / "pretrained")))
    assert list(config.model.block_out_channels) == [8]
    _, _, state, _ = create_train_state(config, make_mesh(), make_optimizer(config, 10))
    expected = nnx.state(load_unet(str(tmp_path / "pretrained")), nnx.Param)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    only_config = resolve_config(tiny_config(tmp_path, model_config_name_or_path=str(tmp_path / "pretrained")))
    assert list(only_config.model.block_out_channels) == [8] and only_config.model.norm_num_groups == 4
