"""Where a train step's time goes: one layer's forward + backward, ours (JAX) beside torch's, in one run.

    python bench/bench_layers.py                        # the default UNet's layer shapes, batch 16
    python bench/bench_layers.py --model small --batch-size 16
    python bench/bench_layers.py --only conv3x3 --isa avx2
    taskset -c 0 python bench/bench_layers.py --clock cpu     # on a busy shared machine: one core, CPU time

Layers: 3x3 convolution (as the train step runs it, the op, the op without YNNPACK, as a matmul: `CONV_IMPLS`),
the stride-2 downsampling convolution, GroupNorm + SiLU, and the attention block (all heads at once through
jax.nn.dot_product_attention, one head at a time, and blockwise with its own backward pass). For each, ours is
`jax.jit(jax.grad(sum(layer(x) * probe)))` over input and weights; theirs the same with torch.nn (oneDNN). The
variants take turns, so a busy machine slows all alike: read the ratios (our time / torch's). A turn is `--block`
timed calls after 50 ms of untimed ones (`bench_train_step.interleaved_times`): torch's OpenMP threads still spin
after its calls and slowed the next few calls by milliseconds.
`--clock cpu` counts this process's CPU time instead of wall time: pinned to one core, it is what a quiet core
would take, which wall time on an oversubscribed machine is not (torch's OpenMP threads wait for each other
there). Not a test.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from bench_train_step import CLOCKS, SETTLE_S, _set_isa, interleaved_times

# The dot-only YNNPACK setting: XLA's own (Eigen) convolution, YNNPACK matmuls.
NO_YNN_CONV = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}

# (resolution, channels) of the resnets' 3x3 convolutions; attention at (resolution, channels, head_dim).
SHAPES = {
    "default": {"convs": [(64, 128), (32, 128), (16, 256), (8, 256), (4, 512), (2, 512)], "attention": [(4, 512, 8)]},
    "small": {"convs": [(32, 32), (16, 64), (8, 64)], "attention": [(16, 64, 8)]},
}


def _run(fn, *args) -> None:
    import jax

    jax.block_until_ready(fn(*args))


def _jax_grad(layer_fn, x, params, compiler_options=None):
    """Compiled d/d(x, params) of sum(layer(x, params) * probe), probe fixed."""
    import jax
    import jax.numpy as jnp

    probe = jax.random.normal(jax.random.key(1), jax.eval_shape(layer_fn, x, params).shape, jnp.float32)
    loss = lambda x, p, probe: jnp.sum(layer_fn(x, p) * probe)
    grad = jax.jit(jax.grad(loss, (0, 1))).lower(x, params, probe).compile(compiler_options=compiler_options or {})
    return lambda x, p: grad(x, p, probe)  # probe passed in: as a captured constant XLA would fold through it


def _nchw(x_BHWC):
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(x_BHWC).transpose(0, 3, 1, 2).copy())


def _torch_grad(module, x_nchw):
    import torch

    x_nchw = x_nchw.clone().requires_grad_(True)
    with torch.no_grad():
        probe = torch.randn_like(module(x_nchw))

    def run():
        module.zero_grad(set_to_none=True)
        x_nchw.grad = None
        (module(x_nchw) * probe).sum().backward()

    return run


def conv_cases(shapes, batch: int, stride: int):
    """{name: run} for a 3x3 convolution (stride 1 or 2, padding 1) over each (resolution, channels)."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    from uncond_flax.models.layers import CONV_IMPLS
    from uncond_flax.step import step_compiler_options

    rng = np.random.default_rng(0)
    cases = {}
    for res, ch in shapes:
        x = jnp.asarray(rng.standard_normal((batch, res, res, ch), np.float32))
        w = jnp.asarray(rng.standard_normal((3, 3, ch, ch), np.float32) * 0.05)
        flops = 3 * 2 * batch * (res // stride) ** 2 * 9 * ch * ch
        tag = f"conv3x3 s{stride} {res}px {ch}ch"

        def layer(x, w, impl):
            return CONV_IMPLS[impl](
                x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            )

        cases[tag] = {
            "flops": flops,
            "runs": {
                # As the train step runs it: conv_auto, compiled with the step's options (XLA's own convolutions).
                "jax step": (_jax_grad(lambda x, w: layer(x, w, "auto"), x, w, step_compiler_options()), x, w),
                "jax conv": (_jax_grad(lambda x, w: layer(x, w, "conv"), x, w), x, w),
                "jax conv (no YNN)": (_jax_grad(lambda x, w: layer(x, w, "conv"), x, w, NO_YNN_CONV), x, w),
                "jax matmul": (_jax_grad(lambda x, w: layer(x, w, "matmul"), x, w), x, w),
                "torch": (
                    _torch_grad(
                        torch.nn.Conv2d(ch, ch, 3, stride, 1),
                        _nchw(x),
                    ),
                ),
            },
        }
    return cases


def norm_cases(shapes, batch: int):
    """GroupNorm(32) + SiLU: our nnx.GroupNorm as the model builds it, against torch's two modules."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from uncond_flax.models.layers import group_norm

    rng = np.random.default_rng(0)
    cases = {}
    for res, ch in shapes:
        groups = min(32, ch)
        x = jnp.asarray(rng.standard_normal((batch, res, res, ch), np.float32))
        graphdef, params = nnx.split(group_norm(ch, groups, 1e-5, rngs=nnx.Rngs(0)))
        layer = lambda x, p, g=graphdef: jax.nn.silu(nnx.merge(g, p)(x))
        torch_module = torch.nn.Sequential(torch.nn.GroupNorm(groups, ch), torch.nn.SiLU())
        cases[f"groupnorm+silu {res}px {ch}ch"] = {
            "flops": None,
            "runs": {
                "jax": (_jax_grad(layer, x, params), x, params),
                "torch": (_torch_grad(torch_module, _nchw(x)),),
            },
        }
    return cases


def attention_cases(shapes, batch: int):
    """diffusers' spatial attention block (norm, q/k/v, softmax attention, out, residual)."""
    import jax.numpy as jnp
    import numpy as np
    from diffusers.models.attention_processor import Attention as TorchAttention
    from flax import nnx

    from uncond_flax.models.attention import Attention
    from uncond_flax.models.layers import implementations

    rng = np.random.default_rng(0)
    cases = {}
    for res, ch, head_dim in shapes:
        x = jnp.asarray(rng.standard_normal((batch, res, res, ch), np.float32))
        heads = ch // head_dim
        jax_runs = {}
        for impl in ("xla", "per_head", "blockwise"):
            with implementations(attention=impl):
                graphdef, params = nnx.split(
                    Attention(ch, heads=heads, dim_head=head_dim, norm_num_groups=32, rngs=nnx.Rngs(0))
                )
            layer = lambda x, p, g=graphdef: nnx.merge(g, p)(x)
            jax_runs[f"jax {impl}"] = (_jax_grad(layer, x, params), x, params)
        theirs = TorchAttention(
            ch, heads=heads, dim_head=head_dim, norm_num_groups=32, residual_connection=True, bias=True,
            upcast_softmax=True, _from_deprecated_attn_block=True,
        )  # fmt: skip
        cases[f"attention {res}px {ch}ch {heads} heads"] = {
            "flops": None,
            "runs": {**jax_runs, "torch": (_torch_grad(theirs, _nchw(x)),)},
        }
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", choices=list(SHAPES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per variant (median reported)")
    parser.add_argument(
        "--block",
        type=int,
        default=5,
        help=f"timed calls per turn, after {SETTLE_S * 1e3:.0f} ms of untimed calls (default %(default)s)",
    )
    parser.add_argument("--only", default=None, help="run only cases whose name starts with this")
    parser.add_argument(
        "--isa", default="native", choices=["native", "avx2"], help="limit both sides to AVX2 (AVX2_ENVIRONMENT)"
    )
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS), help="wall time, or this process's CPU time")
    args = parser.parse_args()
    _set_isa(args.isa)
    import jax
    import torch

    shapes = SHAPES[args.model]
    builders = {
        "conv3x3": lambda: conv_cases(shapes["convs"], args.batch_size, 1),
        "downsample": lambda: conv_cases(shapes["convs"][:-1], args.batch_size, 2),
        "groupnorm": lambda: norm_cases(shapes["convs"], args.batch_size),
        "attention": lambda: attention_cases(shapes["attention"], args.batch_size),
    }
    print(
        f"{args.model} UNet layers, batch {args.batch_size}, fp32, fwd+bwd, {args.clock} clock; isa={args.isa} "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; jax {jax.__version__}, torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    )
    for kind, build in builders.items():
        if args.only and not kind.startswith(args.only):
            continue
        for name, case in build().items():
            runs = {variant: functools.partial(_run, fn, *fn_args) for variant, (fn, *fn_args) in case["runs"].items()}
            for run in runs.values():
                run()  # warm-up
            times = interleaved_times(runs, args.repeats, CLOCKS[args.clock], args.block)
            median = {variant: statistics.median(t) for variant, t in times.items()}
            cells = []
            for variant, m in median.items():
                rate = f" {case['flops'] / m / 1e9:.0f} GF/s" if case["flops"] else ""
                ratio = f" {m / median['torch']:.2f}x" if variant != "torch" else ""
                cells.append(f"{variant} {m * 1e3:.1f} ms{rate}{ratio}")
            print(f"{name:36s} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
