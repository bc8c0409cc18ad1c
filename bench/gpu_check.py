"""One-shot accelerator check: our train step against diffusers' on the same GPU, in about 6 minutes.

    bash bench/gpu_check.sh                          # on the GPU machine: installs .whl/, then runs this
    python bench/gpu_check.py                        # preset from the backend: default on a GPU, else small
    python bench/gpu_check.py --preset tiny          # a few minutes on a CPU: exercises every section
    python bench/gpu_check.py --section jax-step --precision bf16   # one section, in this process
    python bench/gpu_check.py --section jax-step --batch 256 --gradient-checkpointing   # memory against compute
    bash bench/gpu_check.sh --sections jax-step,torch-step --set model.layers_per_block=1   # another config field
    bash bench/gpu_check.sh --sections jax-step --steps-per-call 4   # 4 train steps per call (a lax.scan), not kept
    bash bench/gpu_check.sh --sections jax-step:bf16,torch-step     # bf16 alone (jax-step:no: fp32 alone)

Sections, each in its own process under a hard time limit (a section that overruns is killed and reported; the
others still run, and everything measured so far has been printed already):
  env        backend, devices, versions
  jax-step   the train_unconditional UNet's jitted train step (64 px on GPU) in bf16 and fp32: compile time,
             step time, img/s, FLOPs per step (XLA cost analysis), MFU, peak device memory; in bf16 also where
             the step's time goes: 3 steps under jax.profiler, XLA's ops by kind (--profile-steps)
  torch-step the same UNet in diffusers with torch AdamW + clip_grad_norm_ (bf16 autocast on GPU), and the ratio
  tiny-train 200 optimizer steps of a tiny config on real digits (synthetic bars without scikit-learn): the loss
             must fall
  attention  jax.nn.dot_product_attention, implementation="cudnn" against "xla": time and agreement
Results are also written as JSON to --out (default: $OUT/gpu_check.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from uncond_flax.errors import one_line  # noqa: E402 -- standard library only, after the path is set

RESULT_PREFIX = "RESULT "

# Sizes per preset. "default": train_unconditional's default UNet at 64 px; "small": the small CPU config;
# "tiny": the tests' one-level UNet at 8 px, so every section runs in seconds on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "model": "default",
        "resolution": 64,
        "batch": 64,
        "steps": 20,
        "torch_precision": "bf16",
        "train_steps": 200,
    },
    "small": {"model": "small", "resolution": 32, "batch": 8, "steps": 3, "torch_precision": "no", "train_steps": 200},
    "tiny": {"model": "tiny", "resolution": 8, "batch": 16, "steps": 2, "torch_precision": "no", "train_steps": 60},
}
# Seconds per section with the default preset on a GPU (6 minutes with process starts); scaled for the others.
# Run in this order; fp32 comes last and gets what is left of the total. Measured on one H100 (2026-11-26, jax
# 0.11.2) with XLA_FLAGS=--xla_gpu_enable_triton_gemm=false (gpu_check.sh's default): bf16 41 s to create the
# state + 79 s to compile; fp32 33 s + 49 s; torch's section 23 s. With Triton GEMMs left on, XLA's autotuning
# had not finished compiling the bf16 step after 110 s; with --xla_gpu_autotune_level=0 it compiles in 57 s but
# cuDNN's untuned convolutions make a step take 30 s instead of 42 ms.
BUDGETS = {"env": 45, "jax-step:bf16": 150, "torch-step": 40, "tiny-train": 35, "attention": 20, "jax-step:no": 110}
TOTAL_LIMIT_S = 350.0
# --sections keys for one precision of the jax-step section (the section name alone runs both).
PRECISION_KEYS = ("jax-step:bf16", "jax-step:no")
PRESET_TIME_SCALE = {"default": 1.0, "small": 4.0, "tiny": 2.0}


def _say(*args: Any) -> None:
    print(*args, flush=True)


def _report(name: str, result: dict[str, Any]) -> None:
    _say(RESULT_PREFIX + json.dumps({"section": name, **result}))


# --------------------------------------------------------------------------------------------------------------
# configs


def bench_config(
    preset: str,
    precision: str = "no",
    batch: int | None = None,
    devices: int | None = None,
    overrides: Sequence[tuple[str, Any]] = (),
) -> Any:
    """The resolved training config a preset measures: global batch `batch` split over `devices` (default: JAX's),
    then the (dotted field, value) `overrides` (`--set`), checked as the trainer checks a config."""
    from configs import default
    from uncond_flax.config import resolve_config

    sizes = PRESETS[preset]
    config = default.get_config()
    config.dataset_name = "digits"
    config.resolution = sizes["resolution"]
    config.mixed_precision = precision
    config.lr_scheduler = "constant_with_warmup"
    config.lr_warmup_steps = 10
    if sizes["model"] == "small":
        config.model.block_out_channels = (32, 64, 64)
        config.model.down_block_types = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D")
        config.model.up_block_types = ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
        config.model.layers_per_block = 1
    elif sizes["model"] == "tiny":
        _tiny_model(config)
    if devices is None:
        import jax

        devices = jax.device_count()
    config.train_batch_size = max(1, (batch or sizes["batch"]) // devices)
    for field, value in overrides:
        *parents, leaf = field.split(".")
        target = config
        for parent in parents:
            target = target[parent]
        if leaf not in target:
            raise KeyError(f"--set {field}: no such config field")
        target[leaf] = value
    return resolve_config(config)


def _tiny_model(config: Any) -> None:
    sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
    from tiny_digits import get_config as tiny

    config.model = tiny().model
    config.learning_rate = 1e-3  # the tiny-train section's loss must fall within a few dozen steps


# --------------------------------------------------------------------------------------------------------------
# sections (each runs in its own process; each prints as it goes and returns its numbers)


def section_env(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    device = jax.devices()[0]
    result = {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "preset": "default" if jax.default_backend() == "gpu" else "small",
    }
    # Reported at once, before the slow imports below (torch, diffusers: more than 15 s on a fresh GPU machine),
    # so that a section cut short still tells the driver which preset "auto" means.
    _report("env", result)
    try:
        import torch

        result.update(torch=torch.__version__, torch_cuda=torch.cuda.is_available())
    except ImportError as e:
        result["torch"] = f"missing ({e})"
    for name in ("flax", "optax", "orbax.checkpoint", "grain", "diffusers", "ml_collections"):
        try:
            module = __import__(name, fromlist=["__version__"])
            result[name] = getattr(module, "__version__", "?")
        except ImportError as e:
            result[name] = f"missing ({e})"
    for key, value in result.items():
        _say(f"  {key}: {value}")
    return result


def _peak_bytes(device: Any) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return (stats or {}).get("peak_bytes_in_use")


def train_step_fn(config: Any, graphdef: Any, tx: Any) -> Callable:
    """The trainer's step function (`make_train_step`), before jit, with the schedule of `bench_config`'s
    constant_with_warmup lr (the program does not depend on the number of steps)."""
    from uncond_flax.config import noise_scheduler_for
    from uncond_flax.optim import lr_schedule_for
    from uncond_flax.step import make_train_step

    schedule = lr_schedule_for(config, 10_000)
    return make_train_step(graphdef, tx=tx, lr_fn=schedule, noise_scheduler=noise_scheduler_for(config), config=config)


def compile_step(
    config: Any,
    mesh: Any = None,
    compiler_options: dict[str, str] | None = None,
    keep: bool = False,
    steps_per_call: int = 1,
) -> tuple[Any, Any, Any, float, float | None]:
    """(compiled train step, fresh state, images sharding, compile seconds, FLOPs per step per device): the
    trainer's step, shardings and donation, on `mesh` (default: every device). The step takes and returns the
    state's leaves, as the trainer's does: `leaves, metrics = step(jax.tree.leaves(state), images)` (the config's
    seed, the trainer's third argument, is bound). Programs are
    equal for equal configs, so a second call is served by the compilation cache. `keep`: as the trainer does it
    (`compile_cache.compile_or_load`: a program compiled once is kept, and loaded untraced after).
    `steps_per_call` K > 1: a variant the trainer does not have, K steps in one call (`multi_step`): it takes K
    batches stacked, (K, A, B, H, W, C), and returns each step's metrics stacked; the FLOPs are per step."""
    import jax

    from uncond_flax.compile_cache import jax_cache_hits
    from uncond_flax.flops import step_flops
    from uncond_flax.optim import make_optimizer
    from uncond_flax.parallel import make_mesh
    from uncond_flax.step import jit_train_step, step_seed
    from uncond_flax.train_state import create_train_state

    mesh = make_mesh() if mesh is None else mesh
    _step_from_cache[0] = False
    # constant_with_warmup (bench_config): the program does not depend on the number of steps.
    tx = make_optimizer(config, 10_000)
    start = time.perf_counter()
    graphdef, _, state, shardings = create_train_state(config, mesh, tx)
    # Waited for, as the trainer does (it reads state.step): a CPU runs the init program in the background, and the
    # step's trace and lowering would otherwise share its core (and wait for it to read a constant), counting its
    # run as compile time.
    jax.block_until_ready(state)
    _say(f"  state created in {time.perf_counter() - start:.1f} s")
    step_fn = train_step_fn(config, graphdef, tx)
    jitted, images_sharding = jit_train_step(step_fn, shardings, mesh)
    batch = config.train_batch_size * mesh.devices.size
    shape = (config.gradient_accumulation_steps, batch, config.resolution, config.resolution, config.model.in_channels)
    if steps_per_call > 1:
        if keep:
            raise ValueError("steps_per_call > 1 is a bench variant: it is not kept")
        jitted, images_sharding = multi_step(step_fn, shardings, mesh)
        shape = (steps_per_call, *shape)
    start = time.perf_counter()
    batch_spec = jax.ShapeDtypeStruct(shape, "uint8", sharding=images_sharding)
    leaves = jax.tree.leaves(state)  # the step's form of the state (jit_train_step)
    seed = step_seed(config.seed, mesh)
    if keep:
        from uncond_flax.compile_cache import compile_or_load
        from uncond_flax.step import step_program_inputs

        compiled, facts, loaded = compile_or_load(
            jitted,
            (leaves, batch_spec, seed),
            name="train_step",
            shardings=(jax.tree.leaves(shardings), images_sharding),
            inputs=step_program_inputs(config, 10_000),
            info=lambda traced: {"flops": step_flops(traced, mesh.devices.size)},
        )
        seconds = time.perf_counter() - start
        _say(f"  {'loaded, untraced,' if loaded else 'traced, lowered and compiled'} in {seconds:.1f} s")
        return _seeded(compiled, seed), state, images_sharding, seconds, facts.get("flops")
    traced = jitted.trace(leaves, batch_spec, seed)
    lowered = traced.lower()
    lowering_s = time.perf_counter() - start
    hits = jax_cache_hits()
    compiled = lowered.compile(compiler_options=compiler_options)
    seconds = time.perf_counter() - start
    _step_from_cache[0] = jax_cache_hits() > hits
    _say(
        f"  traced and lowered in {lowering_s:.1f} s, compiled (XLA) in {seconds - lowering_s:.1f} s"
        + (" (loaded from JAX's compilation cache: not a compile time)" if _step_from_cache[0] else "")
    )
    flops = step_flops(traced, mesh.devices.size)
    return _seeded(compiled, seed), state, images_sharding, seconds, flops / steps_per_call if flops else flops


def multi_step(step_fn: Callable, state_shardings: Any, mesh: Any) -> tuple[Any, Any]:
    """(jitted, images sharding): `jit_train_step`'s step run over K stacked batches in one call, a `lax.scan`
    whose carry is the state's leaves: `step(leaves, images_KABHWC, seed) -> (leaves, metrics stacked over K)`.
    One dispatch for K steps: what a host-bound accelerator would gain (README: the H100's step is host-bound at
    batch 64). The same steps, in the same order, as K calls of the trainer's step."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from uncond_flax.parallel import batch_sharding, replicated
    from uncond_flax.step import step_compiler_options

    images_sharding = NamedSharding(mesh, PartitionSpec(None, None, *batch_sharding(mesh).spec))
    treedef = jax.tree.structure(state_shardings)
    leaf_shardings = treedef.flatten_up_to(state_shardings)

    def steps(leaves: list, images_KABHWC: Any, seed: Any) -> tuple[list, dict]:
        def one(leaves: list, images: Any) -> tuple[list, dict]:
            state, metrics = step_fn(treedef.unflatten(leaves), images, seed)
            return treedef.flatten_up_to(state), metrics

        return jax.lax.scan(one, leaves, images_KABHWC)

    jitted = jax.jit(
        steps,
        in_shardings=(leaf_shardings, images_sharding, replicated(mesh)),
        out_shardings=(leaf_shardings, replicated(mesh)),
        donate_argnums=0,
        compiler_options=step_compiler_options(),
    )
    return jitted, images_sharding


def _seeded(compiled: Any, seed: Any) -> Callable:
    """`compiled(leaves, images, seed)` as `step(leaves, images)`."""

    def step(leaves: Any, images: Any) -> Any:
        return compiled(leaves, images, seed)

    step.compiled = compiled  # its optimized program: `step.compiled.as_text()` (bench/profile_step.py)
    return step


_step_from_cache = [False]  # whether compile_step's last program came from JAX's persistent cache


def _op_kind(name: str) -> str:
    """An XLA op's kind from its trace event's name: "loop_add_fusion.12" (CPU) or "loop_add_fusion_12" (GPU) ->
    "loop_add_fusion"; a cuDNN convolution kernel ("sm90_xmma_dgrad_implicit_gemm_bf16..._cudnn") -> "cudnn conv
    dgrad" (fprop: forward, dgrad: input gradient, wgrad: weight gradient), whatever its tile sizes."""
    name = name.split(" = ")[0].strip().lstrip("%")
    conv = re.search(r"(fprop|dgrad|wgrad)", name) if "cudnn" in name or "xmma" in name else None
    if conv:
        return f"cudnn conv {conv.group(1)}"
    return re.sub(r"[._]\d+$", "", name)


def _op_events(plane: Any) -> list[tuple[str, int]]:
    """(name, duration ns) of the XLA ops one trace plane ran: a device's "XLA Ops" line (else its
    streams' kernels); on the host, the XLA:CPU threads' outermost events that are not the executor's own."""
    lines = list(plane.lines)
    if plane.name.startswith("/device:"):
        chosen = [line for line in lines if line.name == "XLA Ops"] or [
            line for line in lines if line.name.startswith("Stream")
        ]
        return [(e.name, e.duration_ns) for line in chosen for e in line.events]
    events = []
    for line in lines:
        if not line.name.startswith("tf_XLA"):
            continue
        end = -1
        for e in sorted(line.events, key=lambda e: (e.start_ns, -e.duration_ns)):
            if e.name.startswith(_HOST_NOT_OPS) or e.start_ns < end:  # not an op, or nested in one
                continue
            end = e.start_ns + e.duration_ns
            events.append((e.name, e.duration_ns))
    return events


# XLA:CPU's own bookkeeping in a host trace; every other event on its threads is an op (thunk) of the program.
_HOST_NOT_OPS = ("ThunkExecutor", "ThreadpoolListener", "end: ")


def _host_events(plane: Any) -> list[tuple[str, int]]:
    """(name, duration ns) of what the host's own threads did, Python's frames ("$file:line name") left out: the
    runtime's calls (jit dispatch, argument handling, XLA's Execute, kernel and CUDA-graph launches). Not XLA:CPU's
    op threads (`_op_events`)."""
    if plane.name != "/host:CPU":
        return []
    return [
        (e.name, e.duration_ns)
        for line in plane.lines
        if not line.name.startswith("tf_XLA")
        for e in line.events
        if not e.name.startswith("$")
    ]


def _by_kind(events: list[tuple[str, int]], steps: int) -> tuple[dict[str, float], dict[str, int]]:
    """(ms per step, events) of each kind (`_op_kind`) among (name, duration ns) events of `steps` steps."""
    ms: dict[str, float] = {}
    count: dict[str, int] = {}
    for name, duration in events:
        kind = _op_kind(name)
        ms[kind] = ms.get(kind, 0.0) + duration / 1e6 / steps
        count[kind] = count.get(kind, 0) + 1
    return ms, count


def traced_calls(run_step: Callable[[], Any], steps: int, keep_trace: str | None = None) -> Any:
    """`steps` calls of `run_step` under jax.profiler: the trace, as `jax.profiler.ProfileData`. `keep_trace`: a path
    the trace (.xplane.pb) is copied to."""
    import glob
    import tempfile

    import jax

    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        try:
            for _ in range(steps):
                run_step()
        finally:
            jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if keep_trace:
            os.makedirs(os.path.dirname(os.path.abspath(keep_trace)), exist_ok=True)
            shutil.copyfile(path, keep_trace)
        return jax.profiler.ProfileData.from_file(path)


def op_breakdown(
    run_step: Callable[[], Any], steps: int, step_s: float, top: int = 12, keep_trace: str | None = None
) -> dict[str, Any]:
    """Where a step's time goes: `steps` calls of `run_step` (each waits for its step) under jax.profiler, XLA's
    ops grouped by kind, per step. `busy` is op time over wall time (above 1 where a CPU runs ops in parallel).
    `keep_trace`: a path the trace (.xplane.pb: host threads and device streams) is copied to, for a closer look
    (`jax.profiler.ProfileData.from_file`, or TensorBoard's profile plugin)."""
    data = traced_calls(run_step, steps, keep_trace)
    events = [e for plane in data.planes for e in _op_events(plane)]
    host = [e for plane in data.planes for e in _host_events(plane)]
    total, count = _by_kind(events, steps)
    op_ms = sum(total.values())
    kinds = sorted(total, key=total.get, reverse=True)[:top]
    host_ms, host_count = _by_kind(host, steps)
    return {
        "op_ms_per_step": op_ms,
        "busy": op_ms / 1e3 / step_s if step_s else None,
        "ops": [[k, round(total[k], 3), count[k] // steps, round(total[k] / op_ms, 4)] for k in kinds],
        # What the host does per step, inclusive (an event's time holds the events inside it): launches, graphs.
        "host": [
            [k, round(host_ms[k], 3), host_count[k] // steps]
            for k in sorted(host_ms, key=host_ms.get, reverse=True)[:top]
        ],
    }


def jax_step(
    config: Any,
    steps: int,
    profile_steps: int = 0,
    report: Callable[[dict[str, Any]], None] | None = None,
    keep_trace: str | None = None,
    steps_per_call: int = 1,
) -> dict[str, Any]:
    """Compile and time our real train step on random uint8 images: FLOPs, MFU, memory; then, with
    `profile_steps`, where the step's time goes (`op_breakdown`, its trace copied to `keep_trace`), after handing
    the timings to `report`. `steps_per_call` K > 1: K steps per call (`multi_step`); `steps` is rounded up to
    whole calls, and every figure is per step."""
    import jax
    import numpy as np

    from uncond_flax.flops import mfu, peak_flops

    from uncond_flax.step import step_compiler_options

    compiled, state, images_sharding, compile_s, flops = compile_step(config, steps_per_call=steps_per_call)
    _say(f"  the step's compiler options: {step_compiler_options()}")
    params = sum(x.size for x in jax.tree.leaves(state.params))
    leaves = jax.tree.leaves(state)  # the step's form (jit_train_step); donated from the first step on
    batch = config.train_batch_size * jax.device_count()
    shape = (config.gradient_accumulation_steps, batch, config.resolution, config.resolution, config.model.in_channels)
    if steps_per_call > 1:
        shape = (steps_per_call, *shape)
        _say(f"  {steps_per_call} steps per call (a lax.scan over stacked batches)")
    images = jax.device_put(np.random.default_rng(0).integers(0, 256, shape, np.uint8), images_sharding)
    calls = -(-steps // steps_per_call)
    _say(f"  compile {compile_s:.1f} s; {flops or 0:.3e} FLOPs per step per device")
    for i in range(2):  # warm-up: first runs allocate (and on GPU may autotune); timed one by one, printed as they go
        start = time.perf_counter()
        leaves, metrics = compiled(leaves, images)
        jax.block_until_ready(metrics)
        _say(f"  warm-up step {i + 1}: {time.perf_counter() - start:.3f} s")
    start = time.perf_counter()
    for _ in range(calls):
        leaves, metrics = compiled(leaves, images)
    loss = float(np.asarray(metrics["loss"]).reshape(-1)[-1])  # waits for the last step
    seconds = (time.perf_counter() - start) / (calls * steps_per_call)
    device = jax.devices()[0]
    utilisation = mfu(flops, seconds, jax.devices(), config.mixed_precision)
    result = {
        "precision": config.mixed_precision,
        "resolution": config.resolution,
        "batch": batch,
        "compile_s": compile_s,
        "compile_from_cache": _step_from_cache[0],
        "compiler_options": step_compiler_options(),
        "step_s": seconds,
        "img_per_s": batch / seconds,
        "flops_per_step": flops,
        "achieved_tflops": flops / seconds / 1e12 if flops else None,
        "peak_tflops": (peak_flops(device, config.mixed_precision) or 0) / 1e12 or None,
        "mfu": utilisation,
        "peak_memory_gib": (_peak_bytes(device) or 0) / 2**30 or None,
        "loss": loss,
        "params": params,
        "gradient_checkpointing": bool(config.get("gradient_checkpointing", False)),
        "steps_per_call": steps_per_call,
    }
    _say(
        f"  step {seconds * 1e3:.1f} ms = {result['img_per_s']:.1f} img/s; "
        f"{result['achieved_tflops'] or 0:.2f} TFLOP/s; MFU {_pct(utilisation)}; "
        f"peak memory {_gib(result['peak_memory_gib'])}"
    )
    if profile_steps:
        if report:  # a section cut short while profiling keeps its timings
            report(dict(result))
        holder = [leaves]

        def run_step() -> None:
            holder[0], step_metrics = compiled(holder[0], images)
            jax.block_until_ready(step_metrics)

        try:  # per call: K steps each
            calls_s = seconds * steps_per_call
            result["profile"] = op_breakdown(run_step, profile_steps, calls_s, keep_trace=keep_trace)
        except Exception as e:  # noqa: BLE001 -- a profiler that cannot start must not cost the timings
            result["profile"] = {"error": f"{type(e).__name__}: {one_line(e)[:200]}"}
        _say(_profile_line(result["profile"]))
    return result


def _profile_line(profile: dict[str, Any], top: int = 6) -> str:
    if "error" in profile:
        return f"  profile: {profile['error']}"
    if not profile["ops"]:
        return "  profile: no op events in the trace (an older XLA:CPU: XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true)"
    ops = ", ".join(f"{kind} {share:.0%}" for kind, _, _, share in profile["ops"][:top])
    line = f"  profile: {profile['op_ms_per_step']:.1f} ms of ops per step (busy {profile['busy']:.2f}): {ops}"
    if profile.get("host"):
        host = "; ".join(f"{kind} {ms:.2f} ms ({n}x)" for kind, ms, n in profile["host"][:top])
        line += f"\n  host, per step (inclusive): {host}"
    return line


def section_jax_step(args: argparse.Namespace) -> dict[str, Any]:
    sizes = PRESETS[args.preset]
    config = bench_config(args.preset, args.precision, args.batch, overrides=args.set)
    # The flag turns remat on; so does `--set gradient_checkpointing=True` (the flag's default must not undo it).
    config.gradient_checkpointing = bool(args.gradient_checkpointing or config.get("gradient_checkpointing", False))
    _say(
        f"  {sizes['model']} UNet, {config.resolution} px, precision {args.precision}"
        + (", gradient checkpointing" if config.gradient_checkpointing else "")
        + "".join(f", {field}={value!r}" for field, value in args.set)
        + (f", {args.steps_per_call} steps per call" if args.steps_per_call > 1 else "")
    )
    from uncond_flax.models.layers import implementations

    impls = dict(args.impl)
    if impls:
        _say("  layers: " + ", ".join(f"{kind}={name}" for kind, name in impls.items()))
    keep_trace = None
    if args.trace_dir:
        variants = [*args.set, *impls.items()]
        label = re.sub(r"[^\w.-]", "_", "".join(f"-{field}-{value}" for field, value in variants))
        label += f"-k{args.steps_per_call}" if args.steps_per_call > 1 else ""
        name = f"jax-step-{args.precision}-b{args.batch or sizes['batch']}{label}.xplane.pb"
        keep_trace = os.path.join(args.trace_dir, name)
    with implementations(**impls):  # the UNet built inside (its state, then the step) computes its layers so
        result = jax_step(
            config,
            args.steps or sizes["steps"],
            args.profile_steps,
            report=lambda result: _report("jax-step", result),
            keep_trace=keep_trace,
            steps_per_call=args.steps_per_call,
        )
    return {**result, "implementations": impls}


def torch_train_step(config: Any, batch: int, precision: str = "no") -> tuple[Callable[[], Any], Any]:
    """(one step, the model): what diffusers' train_unconditional.py does per step, on the GPU when there is one:
    UNet2DModel, add_noise, MSE, backward, clip_grad_norm_(1.0), AdamW, the LR scheduler; bf16 autocast for "bf16"."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = UNet2DModel(**config.model.to_dict()).to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=10_000
    )
    scheduler = DDPMScheduler(num_train_timesteps=config.ddpm_num_steps, beta_schedule=config.ddpm_beta_schedule)
    gen = torch.Generator(device="cpu").manual_seed(0)
    clean = (
        torch.rand(batch, config.model.in_channels, config.resolution, config.resolution, generator=gen) * 2 - 1
    ).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> Any:
        noise = torch.randn_like(clean)
        t = torch.randint(0, config.ddpm_num_steps, (batch,), device=device)
        with autocast:
            pred = model(scheduler.add_noise(clean, noise, t), t).sample
            loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        with torch.profiler.record_function("clip_grad_norm_"):  # a range for bench/profile_step.py
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        return loss

    return step, model


def torch_step(config: Any, batch: int, steps: int, precision: str, warmup: int = 2) -> dict[str, Any]:
    """Time `torch_train_step`: step time, img/s, peak GPU memory."""
    import torch

    step, model = torch_train_step(config, batch, precision)
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss = loss.item()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    _say(f"  torch {precision}: step {seconds * 1e3:.1f} ms = {batch / seconds:.1f} img/s; peak memory {_gib(peak)}")
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "precision": precision,
        "batch": batch,
        "step_s": seconds,
        "img_per_s": batch / seconds,
        "peak_memory_gib": peak,
    }


def section_torch_step(args: argparse.Namespace) -> dict[str, Any]:
    sizes = PRESETS[args.preset]
    precision = args.precision if args.precision != "auto" else sizes["torch_precision"]
    # JAX stays off this process (the driver hides the GPU from it): the batch is the global one JAX ran.
    batch = args.batch or sizes["batch"]
    config = bench_config(args.preset, precision, batch, devices=1, overrides=args.set)
    return torch_step(config, batch, args.steps or sizes["steps"], precision)


def training_images(resolution: int, count: int = 1797) -> tuple[Any, str]:
    """uint8 (N, r, r, 1): scikit-learn's digits (nearest-upscaled), else bars (the GPU machine may lack sklearn)."""
    import numpy as np

    try:
        from sklearn.datasets import load_digits

        digits = (load_digits().images * (255 / 16)).round().astype(np.uint8)[..., None]
        repeat = max(1, resolution // 8)
        return digits.repeat(repeat, axis=1).repeat(repeat, axis=2)[:, :resolution, :resolution], "sklearn digits"
    except ImportError:
        rng = np.random.default_rng(0)
        images = np.zeros((count, resolution, resolution, 1), np.uint8)
        for image, row, col in zip(images, rng.integers(0, resolution, count), rng.integers(0, 2, count)):
            if col:
                image[:, row] = 255
            else:
                image[row, :] = 255
        return images, "synthetic bars"


def tiny_train(steps: int, batch: int = 64, seed: int = 0) -> dict[str, Any]:
    """`steps` optimizer steps of the tiny preset's config (one level, 8 px, grayscale); the loss must fall."""
    import jax
    import numpy as np

    config = bench_config("tiny", "no", batch)
    data, source = training_images(config.resolution)
    step_fn, state, images_sharding, _, _ = compile_step(config)
    leaves = jax.tree.leaves(state)  # the step's form (jit_train_step)
    rng = np.random.default_rng(seed)
    global_batch = config.train_batch_size * jax.device_count()
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        images = jax.device_put(data[rng.integers(0, len(data), global_batch)][None], images_sharding)
        leaves, metrics = step_fn(leaves, images)
        losses.append(metrics["loss"])
    losses = [float(x) for x in jax.device_get(losses)]
    seconds = time.perf_counter() - start
    window = max(1, steps // 10)
    first, last = statistics.mean(losses[:window]), statistics.mean(losses[-window:])
    falls = bool(np.isfinite(losses).all() and last < 0.6 * first)
    _say(
        f"  {steps} steps on {source} (batch {global_batch}, {seconds:.1f} s after compiling): mean loss of the first "
        f"{window} {first:.4f} -> last {window} {last:.4f}: {'falls' if falls else 'DOES NOT FALL'}"
    )
    return {
        "steps": steps,
        "data": source,
        "first_loss": first,
        "last_loss": last,
        "loss_falls": falls,
        "seconds": seconds,
    }


def section_tiny_train(args: argparse.Namespace) -> dict[str, Any]:
    return tiny_train(args.train_steps or PRESETS[args.preset]["train_steps"])


def attention_check(preset: str) -> dict[str, Any]:
    """dot_product_attention with cuDNN's fused kernel against XLA's, on the UNet's attention shapes."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    # (batch, tokens, heads, head_dim): the default UNet's 4x4 attention (512 channels, head_dim 8) and a
    # larger 16x16 one; tiny sizes on CPU.
    shapes = [(64, 16, 64, 8), (16, 256, 8, 64)] if preset == "default" else [(2, 16, 4, 8)]
    result: dict[str, Any] = {}
    for shape in shapes:
        key = "x".join(map(str, shape))
        q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(3))
        outputs, times = {}, {}
        for impl in ("xla", "cudnn"):
            try:
                fn = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(q, k, v, implementation=impl))
                outputs[impl] = jax.block_until_ready(fn(q, k, v))
                start = time.perf_counter()
                for _ in range(20):
                    out = fn(q, k, v)
                jax.block_until_ready(out)
                times[impl] = (time.perf_counter() - start) / 20
                _say(f"  {key} {impl}: {times[impl] * 1e6:.1f} us")
            except Exception as e:  # noqa: BLE001 -- cuDNN is absent on CPU and refuses some shapes
                _say(f"  {key} {impl}: unavailable ({type(e).__name__}: {one_line(e)[:300]})")
        entry: dict[str, Any] = {f"{impl}_us": t * 1e6 for impl, t in times.items()}
        if len(outputs) == 2:
            diff = float(jnp.max(jnp.abs(outputs["xla"].astype(jnp.float32) - outputs["cudnn"].astype(jnp.float32))))
            entry.update(max_abs_diff=diff, equal=bool(np.isfinite(diff) and diff < 2e-2))
            _say(f"  {key}: max |cudnn - xla| = {diff:.2e} ({'equal' if entry['equal'] else 'DIFFERENT'} at bf16)")
        result[key] = entry
    return result


def section_attention(args: argparse.Namespace) -> dict[str, Any]:
    return attention_check(args.preset)


SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "env": section_env,
    "jax-step": section_jax_step,
    "torch-step": section_torch_step,
    "tiny-train": section_tiny_train,
    "attention": section_attention,
}


# --------------------------------------------------------------------------------------------------------------
# driver: every section in a child process with a hard time limit


def _gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} GiB"


def _pct(x: float | None) -> str:
    return "n/a (peak unknown)" if x is None else f"{100 * x:.1f} %"


def run_section(name: str, argv: list[str], budget_s: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `--section name argv` in a child process, echoing its output; kill it after `budget_s` seconds."""
    cmd = [sys.executable, os.path.abspath(__file__), "--section", name, *argv]
    _say(f"== {name} {' '.join(argv)} (limit {budget_s:.0f} s)")
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    results: list[dict[str, Any]] = []

    def pump() -> None:
        for line in proc.stdout:
            if line.startswith(RESULT_PREFIX):
                results.append(json.loads(line[len(RESULT_PREFIX) :]))
            else:
                print("  | " + line.rstrip(), flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status = None
    try:
        proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        status = "timed out"
    except _Stopped:
        status = "stopped (the driver got SIGTERM)"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: only what this run started
            proc.wait()
    reader.join(timeout=5)
    seconds = time.perf_counter() - start
    if results and status is None:
        return {**results[-1], "wall_s": seconds}
    if results:  # cut short after an early report (env's backend and preset): kept, with the error
        _say(f"  {name}: {status} after {seconds:.0f} s; kept what it reported before")
        return {**results[-1], "error": status, "wall_s": seconds}
    status = status or f"exit code {proc.returncode}"
    _say(f"  {name}: no result ({status} after {seconds:.0f} s)")
    return {"section": name, "error": status, "wall_s": seconds}


def summarize(results: dict[str, dict[str, Any]]) -> list[str]:
    """The lines of the final table: JAX per precision, torch, their img/s ratio, the loss check, attention."""
    lines = []
    for key, r in results.items():
        if "error" in r:
            lines.append(f"{key:<16} ERROR: {r['error']}")
        elif r["section"] == "env":
            lines.append(f"{key:<16} {r['device_count']} x {r['device_kind']} ({r['backend']}), jax {r['jax']}")
        elif r["section"] == "jax-step":
            lines.append(
                f"{key:<16} {r['img_per_s']:9.1f} img/s  step {r['step_s'] * 1e3:8.1f} ms  "
                f"compile {r['compile_s']:6.1f} s{' (cache)' if r.get('compile_from_cache') else ''}  "
                f"MFU {_pct(r['mfu'])}  peak mem {_gib(r['peak_memory_gib'])}  (batch {r['batch']}, "
                f"{r['resolution']} px)"
            )
            if "profile" in r:
                lines.append(f"{'':<16}{_profile_line(r['profile'])}")
        elif r["section"] == "torch-step":
            lines.append(
                f"{key:<16} {r['img_per_s']:9.1f} img/s  step {r['step_s'] * 1e3:8.1f} ms  (batch {r['batch']})"
            )
            ours = results.get(f"jax-step:{r['precision']}", {})
            if "img_per_s" in ours:
                lines.append(
                    f"{'ratio':<16} JAX/torch img/s at {r['precision']}: {ours['img_per_s'] / r['img_per_s']:.2f}x"
                )
        elif r["section"] == "tiny-train":
            lines.append(
                f"{key:<16} loss {r['first_loss']:.4f} -> {r['last_loss']:.4f} over {r['steps']} steps: "
                f"{'falls' if r['loss_falls'] else 'DOES NOT FALL'}"
            )
        elif r["section"] == "attention":
            for shape, a in r.items():
                if isinstance(a, dict):
                    lines.append(f"{key:<16} {shape}: {json.dumps({k: round(v, 4) for k, v in a.items()})}")
    return lines


class _Stopped(Exception):
    """SIGTERM reached the driver (e.g. an outer `timeout`): stop the running section, then summarize."""


def _raise_stopped(signum: int, frame: Any) -> None:
    raise _Stopped


def drive(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Run the selected sections one after another in child processes; print and return their results."""
    # One JAX compilation cache for all the sections: each creates the UNet's state, whose init program (the same
    # for both precisions and every batch) took 41-51 s to compile on an H100, and 8-9 s from the cache.
    cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR") or args.cache_dir
    temporary = None
    if not cache_dir:
        cache_dir = temporary = tempfile.mkdtemp(prefix="gpu_check_cache-")
    _say(f"JAX compilation cache for the sections: {cache_dir}" + (" (removed at the end)" if temporary else ""))
    try:
        return _drive(args, {} if cache_dir == "none" else {"JAX_COMPILATION_CACHE_DIR": cache_dir})
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)


def _drive(args: argparse.Namespace, cache_env: dict[str, str]) -> dict[str, dict[str, Any]]:
    started = time.perf_counter()
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
    if out:  # its folder made before any section runs, so that minutes of measurements are not lost at the end
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    signal.signal(signal.SIGTERM, _raise_stopped)
    stopped = False

    def run(key: str, name: str, argv: list[str], env: dict[str, str] | None = None, force: bool = False) -> None:
        nonlocal stopped
        if not (force or name in args.sections or key in args.sections) or stopped:
            return
        scale = args.time_scale * PRESET_TIME_SCALE.get(preset, 1.0)
        total = args.total_limit or TOTAL_LIMIT_S * scale
        left = total - (time.perf_counter() - started)
        budget = min(BUDGETS[key] * scale, left)
        if left < 5:
            _say(f"== {key}: skipped (the total limit is reached)")
            results[key] = {"section": name, "error": "skipped: total time limit"}
            return
        results[key] = run_section(name, argv, budget, {**cache_env, **(env or {})})
        if results[key].get("error", "").startswith("stopped"):
            stopped = True

    preset = args.preset
    # The preset "auto" comes from the env section's backend, so that section runs whenever the preset is auto,
    # named in --sections or not: `--sections jax-step:bf16` on a GPU measures the default UNet, not the small one.
    run("env", "env", [], force=preset == "auto")
    if preset == "auto":
        preset = results.get("env", {}).get("preset")
        if preset is None:
            _say("== the env section gave no backend, so the preset is small; name one with --preset")
            preset = "small"
    common = ["--preset", preset] + (["--batch", str(args.batch)] if args.batch else [])
    common += ["--steps", str(args.steps)] if args.steps else []
    common += [f"--set={field}={value!r}" for field, value in args.set]  # the config both UNets are built from
    traces = ["--trace-dir", args.trace_dir] if args.trace_dir else []
    per_call = ["--steps-per-call", str(args.steps_per_call)] if args.steps_per_call > 1 else []
    per_call += [f"--impl={kind}={name}" for kind, name in args.impl]  # our layers only: torch's are its own
    run(
        "jax-step:bf16",
        "jax-step",
        [*common, "--precision", "bf16", "--profile-steps", str(args.profile_steps), *traces, *per_call],
    )
    # JAX on the CPU there: it would otherwise take most of the GPU's memory before torch starts.
    run("torch-step", "torch-step", common, env={"JAX_PLATFORMS": "cpu"})
    train_steps = ["--train-steps", str(args.train_steps)] if args.train_steps else []
    run("tiny-train", "tiny-train", ["--preset", preset, *train_steps])
    run("attention", "attention", ["--preset", preset])
    run("jax-step:no", "jax-step", [*common, "--precision", "no", "--profile-steps", "0", *per_call])  # time left

    _say(f"\n== summary (preset {preset})")
    for line in summarize(results):
        _say(line)
    if out:
        with open(out, "w") as f:
            json.dump({"preset": preset, "results": results}, f, indent=2)
        _say(f"results written to {out}")
    return results


def _field_value(text: str) -> tuple[str, Any]:
    """FIELD=VALUE -> (field, value): a Python literal where it parses as one, else the string."""
    import ast

    field, sep, value = text.partition("=")
    if not sep or not field:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIELD=VALUE")
    try:
        return field, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return field, value


def _impl_value(text: str) -> tuple[str, str]:
    """KIND=NAME -> (kind, name), checked against the layers' implementations before anything compiles."""
    from uncond_flax.models.layers import IMPLEMENTATION_KINDS, implementations

    kind, sep, name = text.partition("=")
    if not sep or not kind or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KIND=NAME, e.g. norm=fused")
    try:
        with implementations(**{kind: name}):  # its checks, nothing else: the choice is undone on leaving
            pass
    except TypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: KIND is one of {', '.join(IMPLEMENTATION_KINDS)}") from None
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return kind, name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", choices=["auto", *PRESETS], default="auto", help="auto: default on a GPU, else small"
    )
    parser.add_argument("--section", choices=list(SECTIONS), help="run one section here (the driver's child mode)")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help="comma-separated sections the driver runs; jax-step:bf16 or jax-step:no runs that precision alone",
    )
    parser.add_argument("--precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: the preset's)")
    parser.add_argument("--train-steps", type=int, default=None, help="tiny-train steps (default: the preset's)")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="jax-step: recompute each UNet block in the backward pass (memory against compute)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        type=_field_value,
        metavar="FIELD=VALUE",
        help="jax-step and torch-step: a config field, dotted for the model's (model.dropout=0.1); repeatable",
    )
    parser.add_argument(
        "--profile-steps", type=int, default=3, help="jax-step: calls traced for the op breakdown (0: none)"
    )
    parser.add_argument(
        "--steps-per-call",
        type=int,
        default=1,
        help="jax-step: K train steps per call, a lax.scan over K batches (a variant the trainer does not have)",
    )
    parser.add_argument(
        "--impl",
        action="append",
        default=[],
        type=_impl_value,
        metavar="KIND=NAME",
        help="jax-step: how our layers compute, as bench_train_step's --jax (norm=fused, upsample=phases, "
        "attention=xla, conv=..., linear=...; uncond_flax.models.layers.implementations); repeatable",
    )
    parser.add_argument(
        "--trace-dir", default=None, help="jax-step: keep the profiled steps' trace (.xplane.pb) in this folder"
    )
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply every section's time limit")
    parser.add_argument(
        "--total-limit",
        type=float,
        default=None,
        help=f"seconds for all sections (default {TOTAL_LIMIT_S:.0f}, scaled)",
    )
    parser.add_argument("--out", default=None, help="JSON results file")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="the sections' JAX compilation cache (default: $JAX_COMPILATION_CACHE_DIR, else a temporary folder "
        "removed at the end; 'none': no cache)",
    )
    args = parser.parse_args(argv)
    if args.steps_per_call < 1:
        parser.error(f"--steps-per-call {args.steps_per_call}: give 1 or more")
    args.sections = args.sections.split(",")
    choices = [*SECTIONS, *PRECISION_KEYS]
    unknown = set(args.sections) - set(choices)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from {choices}")

    if args.section is None:
        drive(args)
        return 0
    if args.preset == "auto":
        import jax

        args.preset = "default" if jax.default_backend() == "gpu" else "small"
    if args.precision == "auto" and args.section == "jax-step":
        args.precision = "bf16"
    try:
        _report(args.section, SECTIONS[args.section](args))
    except Exception as e:  # noqa: BLE001 -- a failed section reports its error; the driver goes on
        traceback.print_exc()
        _report(args.section, {"error": f"{type(e).__name__}: {one_line(e)[:300]}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
