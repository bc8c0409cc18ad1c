"""Compile time: the train step and the sampler, cold, then from JAX's persistent compilation cache, then (the
train step) loaded untraced as the trainer keeps it.

    python bench/bench_compile.py                 # train_unconditional's UNet (64 px) and the small one (32 px)
    python bench/bench_compile.py --presets tiny  # seconds

Every measurement is a fresh process; the processes share one new cache directory, turned on the way the
trainer turns it on (`uncond_flax.compile_cache.enable_compile_cache`). The first process of each program
compiles it (cold) and writes the cache; the second is a second start of the same run and reads it (cached:
traced, lowered, then loaded from JAX's cache). The train step's third is a second start as the trainer makes it
(kept: the program the first process kept, `compile_cache.compile_or_load`, loaded without tracing). The
sampler's compile time is its first call minus its second (2 steps, 16 images). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

RESULT_PREFIX = "RESULT "


def measure(what: str, preset: str, cache_dir: str) -> dict:
    """In this process: seconds to compile `what` ("train", "train-kept" or "sampler") at `preset`, and the cache
    hits seen. "train" traces, lowers and compiles (or loads from JAX's cache); "train-kept" is the trainer's way,
    which keeps the compiled step and loads it untraced at a second start."""
    from jax import monitoring

    from uncond_flax.compile_cache import enable_compile_cache

    enable_compile_cache(cache_dir)
    hits = []
    monitoring.register_event_listener(lambda event, **_: hits.append(1) if event.endswith("/cache_hits") else None)

    from gpu_check import bench_config, compile_step

    config = bench_config(preset, "no", batch=16 if preset != "tiny" else 8)
    if what in ("train", "train-kept"):
        _, _, _, seconds, _ = compile_step(config, keep=what == "train-kept")
    else:
        import jax

        from uncond_flax.config import noise_scheduler_for
        from uncond_flax.sampling import sample_images
        from uncond_flax.train_state import build_model

        model, scheduler = build_model(config), noise_scheduler_for(config)

        def run() -> float:
            start = time.perf_counter()
            sample_images(model, scheduler, batch_size=16, num_inference_steps=2, key=jax.random.key(0))
            return time.perf_counter() - start

        first = run()
        seconds = max(first - run(), 0.0)
    return {"what": what, "preset": preset, "compile_s": seconds, "cache_hits": len(hits)}


def _child(what: str, preset: str, cache_dir: str) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", what, "--presets", preset, "--cache-dir", cache_dir],
        check=False,
        capture_output=True,
        text=True,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"what": what, "preset": preset, "error": f"exit code {proc.returncode}: {tail}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="default,small", help="comma-separated: default, small, tiny")
    parser.add_argument("--what", default="train,sampler", help="comma-separated: train, sampler")
    parser.add_argument("--child", choices=["train", "train-kept", "sampler"], help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help="the shared cache directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    if args.child:
        print(RESULT_PREFIX + json.dumps(measure(args.child, args.presets, args.cache_dir)), flush=True)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or tmp
        print(f"{'program':<18}{'cold':>10}{'cached':>10}{'kept':>10}  (cache {cache_dir})", flush=True)
        for preset in args.presets.split(","):
            for what in args.what.split(","):
                if what == "train":  # compiled and kept; traced and loaded from JAX's cache; loaded untraced
                    runs = [_child(w, preset, cache_dir) for w in ("train-kept", "train", "train-kept")]
                else:
                    runs = [_child(what, preset, cache_dir) for _ in range(2)]
                label = f"{what}:{preset}"
                failed = [run["error"] for run in runs if "error" in run]
                if failed:
                    print(f"{label:<18} ERROR {failed[0]}", flush=True)
                    continue
                note = "" if runs[1]["cache_hits"] else "  (no cache hit: the second start compiled again)"
                kept = f"{runs[2]['compile_s']:9.1f}s" if len(runs) > 2 else f"{'-':>10}"
                print(f"{label:<18}{runs[0]['compile_s']:9.1f}s{runs[1]['compile_s']:9.1f}s{kept}{note}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
