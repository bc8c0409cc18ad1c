"""Where the README's digits demo spends its time: CPU seconds per phase of one cold run, and the wall time it
would take on a quiet 2-core machine.

    python bench/time_digits_demo.py                            # configs/digits.py, AVX2, fresh compile cache
    python bench/time_digits_demo.py --judge --config.num_epochs=10   # overrides as for train_flax.py; then judge

Runs `train_flax.py --config=configs/digits.py` in this process (same code path, same log) with an empty
compilation cache, so the figure is a newcomer's first run, and XLA (its own code and the oneDNN products in its
convolutions; not YNNPACK's) limited to AVX2 unless `--isa native`. The
machines here are shared, so wall-clock time is inflated by other people's work; CPU time is not (much). Each
phase (start-up and imports, data, state init, train-step compile, steps, previews, exports, checkpoints,
shutdown) gets its process CPU time and its busiest thread's CPU time, and its 2-core wall estimate is
max(CPU / 2, busiest thread): two cores cannot finish it sooner, and a phase that runs on one thread (compiling,
Python) takes its thread's time. `--judge` runs bench/judge_digits.py on the export afterwards, outside the timing.
"""

from __future__ import annotations

import os
import sys
import time

WALL0 = time.perf_counter()  # before the heavy imports: they are part of the demo's start-up

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from collections import defaultdict  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORES = 2
_TICK = os.sysconf("SC_CLK_TCK")


def _thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each live thread of this process."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15 of stat)
    return out


class Phases:
    """A stack of named phases; the time between two boundaries is charged to the phase on top."""

    def __init__(self, first: str):
        self.stack = [first]
        self.rows: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.order: list[str] = []
        # Process start: CPU counts from 0 (the interpreter's own start-up included), wall from this module's top.
        self._wall, self._cpu, self._threads = WALL0, 0.0, {}

    def _charge(self) -> None:
        wall, cpu, threads = time.perf_counter(), time.process_time(), _thread_cpu()
        busiest = max((t - self._threads.get(tid, 0.0) for tid, t in threads.items()), default=0.0)
        row = self.rows[self.stack[-1]]
        if self.stack[-1] not in self.order:
            self.order.append(self.stack[-1])
        row["wall"] += wall - self._wall
        row["cpu"] += cpu - self._cpu
        row["est"] += max((cpu - self._cpu) / CORES, busiest)
        self._wall, self._cpu, self._threads = wall, cpu, threads

    def switch(self, name: str) -> None:
        """End the phase on top and start `name` in its place."""
        self._charge()
        self.stack[-1] = name

    @contextlib.contextmanager
    def inside(self, name: str):
        self._charge()
        self.stack.append(name)
        self.rows[name]["calls"] += 1
        try:
            yield
        finally:
            self._charge()
            self.stack.pop()

    def wrap(self, fn, name):
        def wrapped(*args, **kwargs):
            label = name(self) if callable(name) else name
            with self.inside(label):
                return fn(*args, **kwargs)

        return wrapped


def instrument(phases: Phases) -> None:
    """Charge the trainer's pieces to phases by wrapping the module attributes the loop calls (no behaviour change)."""
    from uncond_flax import checkpointing, epoch_end, train

    train.build_train_loader = phases.wrap(train.build_train_loader, "data (loader)")
    train.train_state_layout = phases.wrap(train.train_state_layout, "init state (build + jit init)")
    train.create_train_state = phases.wrap(train.create_train_state, "init state (build + jit init)")
    jit_train_step = train.jit_train_step

    class Staged:
        """The jitted step and its trace/lower stages as the loop uses them, with their work charged to phases."""

        def __init__(self, staged):
            self.staged = staged

        def __getattr__(self, name):
            attr = getattr(self.staged, name)
            if name in ("trace", "lower"):
                return lambda *a, **k: Staged(phases.wrap(attr, "compile train step (trace + lower)")(*a, **k))
            if name == "compile":
                return phases.wrap(attr, "compile train step (XLA)")
            return attr

    def jit_wrapped(*args, **kwargs):
        step, sharding = jit_train_step(*args, **kwargs)
        return Staged(step), sharding

    train.jit_train_step = jit_wrapped
    compile_or_load = train.compile_or_load

    def compile_or_load_(*a, **k):
        # A kept step (a second start): its load, which began in the background while the state was made.
        result = phases.wrap(compile_or_load, "compile train step (key; load of a kept one)")(*a, **k)
        phases.switch("train steps")  # everything from here that no other phase claims is stepping
        return result

    train.compile_or_load = compile_or_load_
    epoch_end.sample_images = phases.wrap(
        epoch_end.sample_images,
        lambda p: (
            "preview (first: compile + sample)" if "preview (first: compile + sample)" not in p.rows else "preview"
        ),
    )
    epoch_end.export_pipeline = phases.wrap(epoch_end.export_pipeline, "export pipeline")
    checkpointing.Checkpointer.save = phases.wrap(checkpointing.Checkpointer.save, "checkpoint save (blocking part)")
    checkpointing.Checkpointer.wait = phases.wrap(checkpointing.Checkpointer.wait, "checkpoint wait")
    run = train.train_and_evaluate

    def train_and_evaluate(config):
        phases.switch("setup (config, checks, mesh, writers)")
        try:
            return run(config)
        finally:
            phases.switch("shutdown")

    train.train_and_evaluate = train_and_evaluate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "digits.py"))
    parser.add_argument("--isa", default="AVX2", help="XLA's --xla_cpu_max_isa; 'native' leaves it alone")
    parser.add_argument("--output-dir", help="default: a new folder under /tmp")
    parser.add_argument("--warm-cache", help="use this compilation cache instead of an empty one (a second start)")
    parser.add_argument("--judge", action="store_true", help="afterwards, outside the timing: bench/judge_digits.py")
    parser.add_argument("--json", help="also write the figures to this file")
    args, overrides = parser.parse_known_args(argv)
    if args.isa.upper() == "AVX2":  # the benches' AVX2 mode: XLA's code and the oneDNN in its convolutions
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        from bench_train_step import _set_isa

        _set_isa("avx2")
    elif args.isa != "native":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_max_isa={args.isa}").strip()
    out = args.output_dir or tempfile.mkdtemp(prefix="digits-demo-")
    cache = args.warm_cache or tempfile.mkdtemp(prefix="digits-demo-cache-")
    train_argv = [
        "train_flax.py",
        f"--config={args.config}",
        f"--config.output_dir={out}",
        f"--config.compilation_cache_dir={cache}",
        *overrides,
    ]
    phases = Phases("start-up (interpreter + imports)")
    sys.path.insert(0, ROOT)
    from uncond_flax import cli

    instrument(phases)
    code = 0
    try:
        cli.main(train_argv)
    except SystemExit as e:
        code = e.code or 0
    phases.switch("end")
    if code:
        print(f"the demo failed (exit {code})", file=sys.stderr)
        return int(code)

    usage = resource.getrusage(resource.RUSAGE_SELF)
    rows = {k: dict(phases.rows[k]) for k in phases.order if k != "end"}
    total_cpu = sum(r["cpu"] for r in rows.values())
    total_est = sum(r["est"] for r in rows.values())
    total_wall = sum(r["wall"] for r in rows.values())
    print(f"\ndigits demo: {' '.join(train_argv[1:])}")
    isa = ", ".join(f"{key}={os.environ.get(key, '')!r}" for key in ("XLA_FLAGS", "ONEDNN_MAX_CPU_ISA"))
    print(f"{isa}; {os.cpu_count()} CPUs here, load {os.getloadavg()[0]:.1f}")
    print(f"{'phase':<40} {'calls':>5} {'CPU s':>8} {'wall s':>8} {'2-core est s':>13}")
    for name, r in rows.items():
        print(f"{name:<40} {int(r.get('calls', 1)):>5} {r['cpu']:>8.1f} {r['wall']:>8.1f} {r['est']:>13.1f}")
    print(f"{'total':<40} {'':>5} {total_cpu:>8.1f} {total_wall:>8.1f} {total_est:>13.1f}")
    print(
        f"getrusage: user {usage.ru_utime:.1f} s + sys {usage.ru_stime:.1f} s; max RSS {usage.ru_maxrss / 1024:.0f} MiB"
    )
    print(f"estimated wall on 2 quiet cores: {total_est:.0f} s ({total_est / 60:.1f} min); export in {out}")
    result = {
        "argv": train_argv[1:],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "phases": rows,
        "cpu_s": total_cpu,
        "wall_s": total_wall,
        "est_2core_wall_s": total_est,
        "output_dir": out,
    }
    if args.judge:  # a separate process after the timing: the judge's torch sampling must not count
        judged = subprocess.run(
            [sys.executable, os.path.join(ROOT, "bench", "judge_digits.py"), out, "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        result["judge"] = json.loads(judged.stdout.strip().splitlines()[-1])
        samples = result["judge"]["samples"]
        shares = " ".join(f"{d}:{s:.2f}" for d, s in enumerate(samples["class_shares"]))
        print(f"judge: mean confidence {samples['mean_confidence']:.3f} on {samples['n']} samples; shares {shares}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
