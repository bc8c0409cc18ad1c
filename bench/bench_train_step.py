"""Train-step speed against diffusers' PyTorch trainer, same UNet, batch, resolution and fp32, in one run.

    python bench/bench_train_step.py --model small                  # (32, 64, 64), 1 layer per block, 32 px
    python bench/bench_train_step.py --model default                # train_unconditional's 113.7 M UNet, 64 px
    python bench/bench_train_step.py --model default --batch-size 4 --steps 5   # a quicker look
    python bench/bench_train_step.py --model digits --batch-size 64 # the README demo's UNet, 8 px
    python bench/bench_train_step.py --model small --isa avx2       # both sides limited to AVX2
    python bench/bench_train_step.py --jax "" --jax "attention=xla"   # the CPU default vs all heads at once
    python bench/bench_train_step.py --jax "" --jax "norm=grouped"    # GroupNorm: per-channel sums vs flax's
    python bench/bench_train_step.py --jax "attention_block_logits=65536" --jax ""   # one pair per loop step vs 16
    python bench/bench_train_step.py --jax "attention_chains=1" --jax ""   # one chain of products per loop step vs 4
    python bench/bench_train_step.py --model digits --batch-size 64 --jax "attention_min_chain_logits=1" --jax ""
    python bench/bench_train_step.py --jax "group_means=reshape" --jax ""   # GroupNorm's group means: repeat vs dot
    python bench/bench_train_step.py --jax "upsample=nearest_conv" --jax ""   # Upsample2D: as diffusers vs phases
    python bench/bench_train_step.py --accumulation-steps 4 --batch-size 4 --jax "" --jax "accumulation_loop=scan"
    python bench/bench_train_step.py --model default --batch-size 4 --jax "" --jax "grad_norm_reduction=concat"
    python bench/bench_train_step.py --jax "" --jax "conv=matmul" \
        --jax "xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"   # one lever each
    taskset -c 0 python bench/bench_train_step.py --clock cpu       # on a busy shared machine
    python bench/bench_train_step.py --cpu-memory default          # JAX's own: a fresh scratch buffer every step

Ours is the real jitted train step (`uncond_flax.step.make_train_step`: AdamW + global-norm clipping, the
diffusion loss, donated state). Theirs is what train_unconditional.py does per step: `UNet2DModel`, noise and
timesteps, `DDPMScheduler.add_noise`, MSE, `backward`, `clip_grad_norm_(1.0)`, `AdamW.step`, the LR scheduler
step. The sides take turns (`--block` timed steps each, after untimed ones for at least 50 ms: `interleaved_times`),
so a busy machine slows all alike; read the ratios. Each `--jax` adds a
variant of our side, `KEY=VALUE;...`: `conv=` / `attention=` / `norm=` / `linear=` / `upsample=`
(models.layers.implementations),
a top-level config field (`accumulation_loop=`, `grad_norm_reduction=`), `attention_block_logits=` (the blockwise
attention's logits per loop step, models.attention.BLOCK_LOGITS), `attention_chains=` (its independent chains per
loop step, models.attention.CHAINS), `attention_min_chain_logits=` (the fewest logits a chain gets, 1: any,
models.attention.MIN_CHAIN_LOGITS), `group_means=` (dot / reshape:
models.layers.GROUP_MEANS), any other key an XLA compiler option for that
variant's step alone.
No `--jax`: one variant, as the trainer runs. Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Wall time, or this process's CPU time (all its threads): pinned to one core (`taskset -c 0`), the latter is
# what a quiet core would take, which wall time on an oversubscribed machine is not.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

# How the sides take turns (`interleaved_times`): `--block` timed calls per turn, after untimed calls for at least
# SETTLE_S seconds. Right after another library's calls, the cores are still shared with that library's threads
# spinning: after torch's calls, our 3x3 convolution at 16 px x 64 channels (batch 16, forward + backward, both cores
# of a 2-vCPU AMD EPYC) took 3.2-3.4 ms for a few calls, 1.9 ms once settled, and torch's own ~2.5 ms took 3-7 ms
# after ours (bench/bench_layers.py --only conv, turns of 1 call against 20). A train step (~0.1 s) settles them in
# its one untimed call.
BLOCK = 3
SETTLE_S = 0.05


def interleaved_times(
    runs: dict[str, Callable[[], object]],
    calls: int,
    clock: Callable[[], float] = time.perf_counter,
    block: int = BLOCK,
    settle_s: float = SETTLE_S,
) -> dict[str, list[float]]:
    """Seconds of `calls` timed calls of each run. The runs take turns, so a busy machine slows all alike; a turn
    is untimed calls for at least `settle_s` seconds of wall time (one at least: the previous run's threads may
    still be spinning), then up to `block` timed calls."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    while any(len(t) < calls for t in times.values()):
        for name, run in runs.items():
            count = min(block, calls - len(times[name]))
            if count < 1:
                continue
            start = time.perf_counter()
            run()
            while time.perf_counter() - start < settle_s:
                run()
            for _ in range(count):
                start = clock()
                run()
                times[name].append(clock() - start)
    return times


# block_out_channels, layers_per_block, block types and resolution of each benchmarked UNet.
MODELS = {
    "small": {
        "resolution": 32,
        "unet": {
            "block_out_channels": (32, 64, 64),
            "layers_per_block": 1,
            "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        },
    },
    "default": {"resolution": 64, "unet": {}},  # configs/default.py's model: train_unconditional's UNet
    "digits": {"resolution": 8, "unet": {}},  # configs/digits.py's model (the README's demo)
}


# What `--isa avx2` sets: XLA's generated code, torch's own kernels (ATen), and the oneDNN in both. XLA's
# convolutions are Eigen's, whose matrix products call oneDNN's JIT-generated sgemm: `--xla_cpu_max_isa` leaves those
# at AVX-512 (the small UNet's 3x3 convolution at 32 px x 32 channels, forward + backward, one core of an AMD EPYC:
# 209 GFLOP/s with it, 131 with ONEDNN_MAX_CPU_ISA=AVX2 too); torch's convolutions are oneDNN's, its matmuls MKL's.
# Not limited: YNNPACK (our matmuls and reductions), which picks its kernels from the CPU itself.
AVX2_ENVIRONMENT = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


def _set_isa(isa: str) -> None:
    # The libraries read these once, at import: set them before either is imported.
    if isa == "avx2":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX2").strip()
        os.environ.update(AVX2_ENVIRONMENT)


def _config(model: str, batch: int, resolution: int):
    from configs import default, digits

    config = (digits if model == "digits" else default).get_config()
    config.dataset_name = "digits"
    config.resolution = resolution
    config.train_batch_size = batch
    for key, value in MODELS[model]["unet"].items():
        config.model[key] = value
    return config


def jax_side(config, batch: int, variant: dict[str, str]):
    """(run one step, compile seconds): our jitted train step on one device, state donated."""
    import jax
    import numpy as np
    from gpu_check import compile_step

    from uncond_flax.config import resolve_config
    from uncond_flax.models import attention, layers
    from uncond_flax.models.layers import implementations
    from uncond_flax.parallel import make_mesh

    # XLA's boolean options must be Python bools: the string "true" is refused.
    options = {key: {"true": True, "false": False}.get(value, value) for key, value in variant.items()}
    impls = {kind: options.pop(kind, None) for kind in layers.IMPLEMENTATION_KINDS}
    # Module settings read while tracing: (module, attribute, parse) per variant key.
    settings = {
        "attention_block_logits": (attention, "BLOCK_LOGITS", int),
        "attention_chains": (attention, "CHAINS", int),
        "attention_min_chain_logits": (attention, "MIN_CHAIN_LOGITS", int),
        "group_means": (layers, "GROUP_MEANS", str),
    }
    chosen = {key: parse(options.pop(key)) for key, (_, _, parse) in settings.items() if key in options}
    config = config.copy_and_resolve_references()
    for field in [key for key in options if key in config]:  # accumulation_loop=, grad_norm_reduction=, ...
        config[field] = options.pop(field)

    config = resolve_config(config)
    defaults = {key: getattr(module, name) for key, (module, name, _) in settings.items()}
    for key, value in chosen.items():
        setattr(settings[key][0], settings[key][1], value)
    try:
        with implementations(**impls):
            step, state, images_sharding, compile_s, _ = compile_step(
                config, make_mesh(devices=jax.devices()[:1]), compiler_options=options
            )
    finally:
        for key, value in defaults.items():
            setattr(settings[key][0], settings[key][1], value)
    res = config.resolution
    shape = (config.gradient_accumulation_steps, batch, res, res, config.model.in_channels)
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    images = jax.device_put(images, images_sharding)
    holder = [jax.tree.leaves(state)]  # the step's form of the state (jit_train_step)

    def run() -> None:
        holder[0], metrics = step(holder[0], images)
        jax.block_until_ready(metrics)

    run.compiled = step.compiled
    return run, compile_s


def torch_side(config, batch: int):
    """(run one step, parameter count): one step of diffusers' train_unconditional.py (fp32, one process)."""
    from gpu_check import torch_train_step

    from uncond_flax.config import resolve_config

    step, model = torch_train_step(resolve_config(config), batch)
    return step, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's (32 small, 64 default)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (median reported), >= 1")
    parser.add_argument(
        "--block",
        type=int,
        default=BLOCK,
        help=f"timed steps per turn, after untimed ones for {SETTLE_S * 1e3:.0f} ms, one at least (default "
        "%(default)s)",
    )
    parser.add_argument(
        "--isa", default="native", choices=["native", "avx2"], help="limit both sides to AVX2 (AVX2_ENVIRONMENT)"
    )
    parser.add_argument("--jax", action="append", help="a variant of our side, KEY=VALUE;... (repeatable)")
    parser.add_argument("--no-torch", action="store_true", help="time only our side")
    parser.add_argument(
        "--accumulation-steps", type=int, default=1, help="micro-batches per step, ours only (torch is not run)"
    )
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS), help="wall time, or this process's CPU time")
    parser.add_argument(
        "--cpu-memory",
        default="reuse",
        choices=["reuse", "default"],
        help="reuse: as the trainer runs (cpu_reuse_memory: steps inline, freed memory kept); default: JAX's defaults",
    )
    args = parser.parse_args()
    if min(args.steps, args.batch_size, args.accumulation_steps, args.block) < 1:
        parser.error("--steps, --batch-size, --accumulation-steps and --block must be >= 1")
    _set_isa(args.isa)
    if args.cpu_memory == "reuse":  # the trainer's setting (cpu_reuse_memory), process-wide: torch's side too
        from uncond_flax.cpu_runtime import reuse_cpu_memory

        reuse_cpu_memory()
    resolution = args.resolution or MODELS[args.model]["resolution"]
    config = _config(args.model, args.batch_size, resolution)
    config.gradient_accumulation_steps = args.accumulation_steps
    if args.accumulation_steps > 1:
        args.no_torch = True  # one torch step is one micro-batch here

    import jax
    import torch

    runs, compile_s = {}, {}
    for variant in args.jax or [""]:
        settings = dict(kv.split("=", 1) for kv in variant.split(";") if kv)
        runs[f"jax {variant}"], compile_s[variant] = jax_side(config, args.batch_size, settings)
    if not args.no_torch:
        runs["torch"], n_params = torch_side(config, args.batch_size)
    for run in runs.values():  # warm-up: torch's first step allocates, ours may still settle
        run()
    times = interleaved_times(runs, args.steps, CLOCKS[args.clock], args.block)

    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"{args.model} UNet, {resolution} px, batch {args.batch_size} x {args.accumulation_steps} micro-batches, "
        f"fp32, {args.clock} clock, isa={args.isa}, cpu memory {args.cpu_memory}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; jax {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    )
    for variant, seconds in compile_s.items():
        print(f"compile jax {variant}: {seconds:.1f} s")
    width = max(map(len, median))
    for name, m in median.items():
        spread = f"min {min(times[name]):.3f} max {max(times[name]):.3f}"
        vs_torch = f"  {m / median['torch']:.2f}x torch's time" if "torch" in median and name != "torch" else ""
        images = args.batch_size * args.accumulation_steps
        print(f"{name:{width}s}: {m:7.3f} s/step {images / m:7.2f} img/s ({spread}){vs_torch}")
    if "torch" in runs:
        print(
            f"params: {n_params / 1e6:.1f} M; median of {args.steps} steps after one warm-up step, the sides "
            f"taking turns of {args.block} timed steps after untimed ones for {SETTLE_S * 1e3:.0f} ms (one at least)"
        )


if __name__ == "__main__":
    main()
