"""How long `train_flax.py` takes from launch to a train step ready to run, cold and on a second start, and how
the step got there (compiled, or loaded untraced from the programs an earlier start kept).

    python bench/bench_start.py                                    # default UNet, 64 px, batch 4: cold, then 2 again
    python bench/bench_start.py --variant "" --variant cpu_reuse_memory=false   # each on its own cache
    python bench/bench_start.py --shared-cache --variant "" --variant cpu_reuse_memory=false
    python bench/bench_start.py --config tests/fixtures/tiny_digits.py --again 1 --config.train_batch_size=2

Each start is a real process (`train_flax.py` with `--config`, the overrides after the options and the variant's
fields), timed from launch to the log line `train step compiled` and killed there (SIGKILL: the trainer takes a
SIGTERM as a preemption and would save and sample). A variant starts on an empty compilation cache of its own
(`XDG_CACHE_HOME` in a temporary folder), then starts `--again` times on it. With `--shared-cache` every variant
uses one cache, in the order given: a variant whose step keeps the lowered program of the one before but not its
key (another JAX setting, say) then finds it in JAX's cache, and its next start shows whether it was kept.
Wall-clock figures: run it on a quiet machine, or pinned (`taskset`), and compare rows of one run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY = "train step compiled"
KEPT = "train_step loaded in"
JAX_HIT = "loaded from the persistent compilation cache"
DEFAULT_OVERRIDES = [
    "--config.dataset_name=digits",
    "--config.train_batch_size=4",
    "--config.max_train_steps=1",
]


def _kept_steps(cache_home: str) -> set[str]:
    folder = os.path.join(cache_home, "uncond_flax", "jax", "uncond_flax_executables")
    return {n for n in os.listdir(folder) if n.startswith("train_step-")} if os.path.isdir(folder) else set()


def start(config: str, overrides: list[str], cache_home: str, timeout: float) -> dict:
    """One launch to `READY`, then SIGKILL: seconds, the log's `compiled in` figure, and how the step came."""
    before = _kept_steps(cache_home)
    out_dir = tempfile.mkdtemp(prefix="bench-start-out-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["XDG_CACHE_HOME"] = cache_home
    cmd = [sys.executable, os.path.join(ROOT, "train_flax.py"), f"--config={config}"]
    cmd += [f"--config.output_dir={out_dir}", *overrides]
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []
    ready = None
    try:
        deadline = started + timeout
        for line in proc.stdout:
            lines.append(line)
            if READY in line:
                ready = time.perf_counter() - started
                break
            if time.perf_counter() > deadline:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: grain's workers too
        proc.wait()
        shutil.rmtree(out_dir, ignore_errors=True)
    log = "".join(lines)
    if ready is None:
        tail = "".join(lines[-15:])
        raise SystemExit(f"bench_start: no '{READY}' line within {timeout:.0f} s from {' '.join(cmd)}:\n{tail}")
    compiled_in = re.search(r"train step compiled in ([0-9.]+) s", log)
    return {
        "seconds": ready,
        "compiled_in": float(compiled_in.group(1)) if compiled_in else float("nan"),
        "step": "kept, untraced" if KEPT in log else "traced",
        "jax_cache_hits": log.count(JAX_HIT),
        "kept_now": bool(_kept_steps(cache_home) - before),
    }


def _variant_args(variant: str) -> list[str]:
    fields = [f.strip() for f in variant.split(",") if f.strip()]
    for field in fields:
        if "=" not in field:
            raise SystemExit(f"bench_start: --variant {variant!r}: give FIELD=VALUE pairs separated by commas")
    return [f"--config.{f}" for f in fields]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/default.py", help="config file, as train_flax.py takes it")
    parser.add_argument("--variant", action="append", help="FIELD=VALUE[,FIELD=VALUE]; '' as configured")
    parser.add_argument("--again", type=int, default=2, help="starts after the cold one, per variant")
    parser.add_argument("--shared-cache", action="store_true", help="one compilation cache for every variant")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a start may take")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise SystemExit(f"bench_start: unknown argument {bad[0]}; overrides are --config.FIELD=VALUE")
    config = os.path.abspath(args.config)
    if not os.path.isfile(config):
        raise SystemExit(f"bench_start: --config {args.config}: no such file")
    variants = args.variant or [""]
    base = DEFAULT_OVERRIDES + overrides if args.config == "configs/default.py" else overrides
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-start-cache-") as caches:
        for i, variant in enumerate(variants):
            cache_home = os.path.join(caches, "shared" if args.shared_cache else f"v{i}")
            for n in range(1 + args.again):
                first = n == 0 and (not args.shared_cache or i == 0)
                result = start(config, base + _variant_args(variant), cache_home, args.timeout)
                result.update(
                    variant=variant or "(as configured)", start="cold" if first else f"again {n}" if n else "first"
                )
                rows.append(result)
                print(
                    f"{result['variant']:<32} {result['start']:<8} ready in {result['seconds']:6.1f} s "
                    f"(compiled in {result['compiled_in']:5.1f} s)  step {result['step']:<14} "
                    f"JAX cache hits {result['jax_cache_hits']}  kept a step: {'yes' if result['kept_now'] else 'no'}",
                    flush=True,
                )
    return rows


if __name__ == "__main__":
    main()
