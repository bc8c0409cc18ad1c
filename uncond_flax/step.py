"""The diffusion loss and the jitted train step (pure: TrainState in, TrainState out)."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from uncond_flax.config import ACCUMULATION_LOOPS, storable
from uncond_flax.ema import EmaSchedule
from uncond_flax.errors import check_choice
from uncond_flax.optim import global_norm_like_torch
from uncond_flax.parallel import batch_sharding, replicated
from uncond_flax.rng import rngs_outside_traces, step_keys, step_stream_data
from uncond_flax.schedulers.common import PREDICTION_TYPES
from uncond_flax.train_state import TrainState


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] (or uint16 [0, 65535], with preserve_input_precision) -> float32 [-1, 1], as torchvision's
    ToTensor() / ConvertImageDtype then Normalize([0.5], [0.5])."""
    return (images.astype(jnp.float32) / float(jnp.iinfo(images.dtype).max) - 0.5) / 0.5


def diffusion_loss(
    model_output: jax.Array, x0: jax.Array, noise: jax.Array, t_B: jax.Array, scheduler: Any, prediction_type: str
) -> jax.Array:
    """diffusers' train_unconditional loss, in float32: MSE to the noise / SNR-weighted MSE to x0 / MSE to v."""
    model_output = model_output.astype(jnp.float32)
    if prediction_type == "epsilon":
        return jnp.mean((model_output - noise) ** 2)
    if prediction_type == "sample":
        alpha_t = scheduler.alphas_cumprod[t_B].reshape(-1, *([1] * (x0.ndim - 1)))
        snr_weights = alpha_t / (1 - alpha_t)
        return jnp.mean(snr_weights * (model_output - x0) ** 2)
    if prediction_type == "v_prediction":
        return jnp.mean((model_output - scheduler.get_velocity(x0, noise, t_B)) ** 2)
    raise ValueError(f"prediction_type={prediction_type!r}; choose one of {list(PREDICTION_TYPES)}")


def resolve_accumulation_loop(value: str) -> str:
    """How the step sums its micro-batches' gradients (`config.ACCUMULATION_LOOPS`): "unrolled" traces the forward
    and backward pass once per micro-batch, so compile time grows with their number; "scan" runs one traced copy
    in a `lax.scan`; "auto" is unrolled on CPU, where XLA runs convolutions inside a loop body many times slower
    (README, Benchmarks), and scan on GPU and TPU. Both add the same numbers in the same order."""
    check_choice("accumulation_loop", value, ACCUMULATION_LOOPS)
    if value == "auto":
        return "unrolled" if jax.default_backend() == "cpu" else "scan"
    return value


def make_train_step(
    graphdef: nnx.GraphDef,
    *,
    tx: optax.GradientTransformation,
    lr_fn: Callable[[jax.Array], jax.Array],
    noise_scheduler: Any,
    config: Any,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """`train_step(state, images_ABHWC uint8, seed=None) -> (state, metrics)`: A micro-batches accumulated, one
    update. `seed`: `rng.step_stream_data(config.seed)` as an argument (`jit_train_step` passes it: one program
    for every seed), or None for `config.seed` as a constant of the program; the same numbers either way.

    A step whose loss or gradients are not finite changes no weights and no optimizer state (the fp16 loss
    scale backs off); as in diffusers, the EMA still takes its step, toward the unchanged weights. `lr_fn`
    only feeds the logged `lr` (the schedule itself lives in `tx`, counting applied updates).
    """
    prediction_type = config.prediction_type
    accumulation_loop = resolve_accumulation_loop(config.get("accumulation_loop", "auto"))
    num_train_timesteps = noise_scheduler.num_train_timesteps
    use_dropout = config.model.get("dropout", 0.0) > 0
    ema_schedule = EmaSchedule.from_config(config)

    def micro_loss(params, buffers, x0, noise, t_B, dropout_key, loss_scale):
        model = nnx.merge(graphdef, params, buffers)
        noisy = noise_scheduler.add_noise(x0, noise, t_B)
        rngs = rngs_outside_traces(dropout_key, stream="dropout") if use_dropout else None
        loss = diffusion_loss(model(noisy, t_B, rngs=rngs), x0, noise, t_B, noise_scheduler, prediction_type)
        return loss_scale.scale_loss(loss), loss

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def train_step(
        state: TrainState, images_ABHWC: jax.Array, seed: jax.Array | None = None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        k_noise, k_time, k_drop = step_keys(config.seed if seed is None else seed, state.step)
        x0_ABHWC = normalize_images(images_ABHWC)
        # Drawn for the whole step at once: A micro-batches of B see the same numbers as one batch of A*B.
        noise_ABHWC = jax.random.normal(k_noise, x0_ABHWC.shape, jnp.float32)
        t_AB = jax.random.randint(k_time, x0_ABHWC.shape[:2], 0, num_train_timesteps)
        accum = x0_ABHWC.shape[0]

        def micro_step(micro_batch):
            x0, noise, t_B, i = micro_batch
            return grad_fn(state.params, state.buffers, x0, noise, t_B, jax.random.fold_in(k_drop, i), state.loss_scale)

        def add(carry, micro):
            return jax.tree.map(jnp.add, carry[0], micro[0]), carry[1] + micro[1]

        micro_batches = (x0_ABHWC, noise_ABHWC, t_AB, jnp.arange(accum, dtype=jnp.uint32))
        if accumulation_loop == "scan" and accum > 1:  # one micro-batch's program, compiled once
            zeros = jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32)
            (grads, loss_sum), _ = jax.lax.scan(lambda c, m: (add(c, micro_step(m)), None), zeros, micro_batches)
        else:  # unrolled at trace time: A copies of the program, summed from the first (no zeros traced: 0 + x == x)
            grads, loss_sum = micro_step(jax.tree.map(lambda v: v[0], micro_batches))
            for i in range(1, accum):
                grads, loss_sum = add((grads, loss_sum), micro_step(jax.tree.map(lambda v, i=i: v[i], micro_batches)))
        loss = loss_sum / accum
        if accum > 1:  # x / 1 is x: nothing to trace for the usual single micro-batch
            grads = jax.tree.map(lambda g: g / accum, grads)
        grads = state.loss_scale.unscale(grads)
        # Logged, and clipped by: computed once, outside the cond.
        grad_norm = global_norm_like_torch(grads, config.get("grad_norm_reduction", "per_leaf"))
        # A NaN or inf gradient makes the norm NaN or inf: the norm is the check, and the step makes no second pass
        # over the gradients (the default UNet's program: 3,723 instead of 4,919 top-level operations, compiled in
        # ~38 instead of ~41 CPU-s, loaded from the cache in ~3.9 instead of ~5). The one difference from checking
        # every gradient: finite gradients whose squares overflow float32 (a norm above ~1.8e19) skip the step too,
        # where torch's clip_grad_norm_ would scale them by 0 and step.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply_update(params_and_opt_state):
            params, opt_state = params_and_opt_state
            updates, opt_state = tx.update(grads, opt_state, params, global_norm=grad_norm)
            return optax.apply_updates(params, updates), opt_state

        # A skipped (non-finite) step keeps both. A `cond`, not a select between the new and old values: to
        # select, XLA keeps each old Adam moment alive past its in-place update with a copy of every moment (280
        # ms of the default UNet's 6.2 s CPU step; on a 50-leaf toy, 712 instructions instead of 353).
        params, opt_state = jax.lax.cond(finite, apply_update, lambda kept: kept, (state.params, state.opt_state))
        ema_params, ema_step, decay = state.ema_params, state.ema_step, jnp.zeros((), jnp.float32)
        if ema_params is not None:
            ema_step = state.ema_step + 1
            ema_params, decay = ema_schedule.update(ema_params, params, ema_step)

        skipped = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=ema_params,
            ema_step=ema_step,
            loss_scale=state.loss_scale.update(finite),
            skipped_steps=state.skipped_steps + skipped,
            consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1),
        )
        metrics = {
            "loss": loss,
            # The schedule at the count of applied updates (skipped ones do not count): the lr this update used.
            "lr": lr_fn(state.step - state.skipped_steps),
            "grad_norm": grad_norm,
            "ema_decay": decay,
            "skipped_steps": new_state.skipped_steps,
            "consecutive_skips": new_state.consecutive_skips,
        }
        if state.loss_scale.is_dynamic:
            metrics["loss_scale"] = state.loss_scale.scale
        return new_state, metrics

    return train_step


# XLA:CPU (jaxlib 0.10) hands convolutions, matmuls and reductions to YNNPACK. Its convolutions' weight gradients
# (a "kernel" as large as the image, a 3x3 output) ran 3x slower than XLA's own: 34 vs 108 GFLOP/s at 32 px x 64
# channels, 25 vs 88 at 64 px x 128. Matmuls and reductions stay with YNNPACK: without it the reductions ran 4x
# slower. The default UNet's step went from 11.7 to 7.6 s, the small one's from 0.52 to 0.49 s
# (bench/bench_train_step.py --jax "xla_cpu_experimental_ynn_fusion_type=...").
CPU_STEP_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}


# 512-bit vectors in XLA's own loops (element-wise work, reductions, the attention's exp); LLVM prefers 256 because
# 512-bit work lowers the clock of Intel's Skylake-era Xeons. AMD's Zen 4 and later run it at full clock. On a
# 2-vCPU AMD EPYC with AVX-512, both cores: the small UNet's step 0.127 against 0.132-0.136 s, the digits UNet's
# 0.031 against 0.034 s, the default UNet's (batch 4) 1.192 against 1.220 s; one pinned core: 4 % on the small step
# (bench/bench_train_step.py --jax "" --jax "xla_cpu_prefer_vector_width=512", README).
WIDE_VECTOR_OPTIONS = {"xla_cpu_prefer_vector_width": "512"}


def cpu_runs_wide_vectors_at_full_clock(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this machine's CPU is AMD's with AVX-512 (Zen 4 and later), read from Linux's `cpuinfo`; False
    where it cannot be read. The first processor's entry speaks for all."""
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return False
    return fields.get("vendor_id") == "AuthenticAMD" and "avx512f" in fields.get("flags", "").split()


@functools.cache
def step_compiler_options() -> dict[str, str] | None:
    """CPU_STEP_COMPILER_OPTIONS on CPU where this jaxlib knows them (a tiny probe compile), else None; with
    WIDE_VECTOR_OPTIONS on an AMD CPU with AVX-512, unless XLA_FLAGS sets the vector width itself."""
    if jax.default_backend() != "cpu":
        return None
    options = dict(CPU_STEP_COMPILER_OPTIONS)
    if cpu_runs_wide_vectors_at_full_clock() and "xla_cpu_prefer_vector_width" not in os.environ.get("XLA_FLAGS", ""):
        options.update(WIDE_VECTOR_OPTIONS)
    for candidate in (options, CPU_STEP_COMPILER_OPTIONS):
        try:
            jax.jit(jnp.negative).lower(jnp.zeros(2)).compile(compiler_options=candidate)
        except jax.errors.JaxRuntimeError:  # another XLA: no such option or enum value
            continue
        return dict(candidate)
    return None  # XLA's defaults are as good a guess


# Config fields that only the loop around the step reads (outputs, logging, checkpoints, previews, the Hub, the
# cluster, the loader's workers and caches). Every other field, present or future, is taken as read by the traced
# step: a compiled step is reused only where they all match (`step_program_inputs`).
NOT_READ_BY_THE_STEP = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "resume_from_checkpoint",
        "logging_dir",
        "logger",
        "log_every",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "save_images_epochs",
        "save_model_epochs",
        "eval_batch_size",
        "sample_scheduler",
        "sample_num_inference_steps",
        "ddpm_num_inference_steps",
        "push_to_hub",
        "hub_model_id",
        "hub_private_repo",
        "max_consecutive_skips",
        "compilation_cache_dir",
        "cpu_reuse_memory",  # how the process runs programs and keeps memory, not what the step computes
        "seed",  # the jitted step and the init program take the seed's keys as arguments (jit_train_step)
        "dataloader_num_workers",
        "cache_dir",
        "decode_cache",
        "skip_bad_images",
        "distributed",
        "distributed_timeout_s",
        "coordinator_address",
        "num_processes",
        "process_id",
    }
)


def step_program_inputs(config: Any, total_steps: int) -> dict[str, Any]:
    """What `make_train_step`'s program reads besides its arguments and this package's code, as JSON-able values
    (the key of a kept compiled step, `compile_cache.compile_or_load`): the config, less `NOT_READ_BY_THE_STEP`
    and credentials; the number of optimizer steps (the learning-rate schedule); the backend's compile options."""
    fields = {k: v for k, v in storable(config).items() if k not in NOT_READ_BY_THE_STEP}
    return {
        "config": fields,
        "total_steps": total_steps,
        "backend": jax.default_backend(),
        "compiler_options": step_compiler_options(),
    }


def jit_train_step(
    step_fn: Callable, state_shardings: Any, mesh: jax.sharding.Mesh
) -> tuple[Callable, jax.sharding.NamedSharding]:
    """(the step jitted as the trainer runs it, the batch's sharding).

    The jitted step takes and returns the state as its list of leaves, `jax.tree.leaves(state)`, in
    `state_shardings`' tree (`state_from_leaves` builds the TrainState back), and takes the seed as an array
    (`step_seed`): `step(leaves, images, seed) -> (leaves, metrics)`. The leaves are placed as `state_shardings`
    and donated, the batch (A, B, H, W, C) split over every device along B, the seed and the metrics replicated;
    compiled with `step_compiler_options()`. One program serves every seed: a run with another seed loads the
    step kept by the first (`compile_cache`), and JAX's cache serves it too.

    Why leaves: every call flattens its arguments and builds its results, and the TrainState's 1,356 leaves (the
    default UNet with AdamW) sit in as many flax Variables, each flattened and rebuilt in Python: a jitted identity
    on that state took 22 ms a call on one CPU core, on its list of leaves 3 ms. On an H100 the default step at
    batch 64 runs 28 ms of kernels in a 46 ms step, its host the bottleneck (README, Benchmarks).
    """
    images_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *batch_sharding(mesh).spec))
    treedef = jax.tree.structure(state_shardings)
    leaf_shardings = treedef.flatten_up_to(state_shardings)

    def step_on_leaves(
        leaves: list[jax.Array], images: jax.Array, seed: jax.Array
    ) -> tuple[list[jax.Array], dict[str, jax.Array]]:
        state, metrics = step_fn(treedef.unflatten(leaves), images, seed)
        return treedef.flatten_up_to(state), metrics

    step_on_leaves.__name__ = getattr(step_fn, "__name__", "train_step")  # the program's name in logs and profiles
    jitted = jax.jit(
        step_on_leaves,
        in_shardings=(leaf_shardings, images_sharding, replicated(mesh)),
        out_shardings=(leaf_shardings, replicated(mesh)),
        donate_argnums=0,
        compiler_options=step_compiler_options(),
    )
    return jitted, images_sharding


def step_seed(seed: int, mesh: jax.sharding.Mesh) -> jax.Array:
    """`jit_train_step`'s seed argument: `rng.step_stream_data(seed)`, a global array replicated over `mesh` (the
    same host value placed in every process, as the sampler places its scheduler)."""
    return jax.device_put(np.asarray(step_stream_data(seed)), replicated(mesh))


def state_from_leaves(like: Any, leaves: list[jax.Array]) -> Any:
    """The TrainState of `jit_train_step`'s leaves, in the tree of `like` (the state, its shardings or its shapes)."""
    return jax.tree.structure(like).unflatten(leaves)
