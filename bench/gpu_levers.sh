#!/usr/bin/env bash
# The GPU levers prepared on a CPU, measured against the trainer's step on one machine in one call (about 6 minutes
# on one H100): the bf16 step as the trainer runs it, then with `--impl norm=fused` (GroupNorm + SiLU with a
# hand-written backward pass), `--impl upsample=phases` (Upsample2D as four 2x2 convolutions) and both; torch's
# step once. Every run goes through gpu_check.sh, so they share one JAX compilation cache and XLA's autotuning
# results, and the state's init program and the unchanged convolutions compile once.
#
# Here, once:        bash ../shared/gpu/fetch_wheels.sh portpicker array-record
# On the GPU machine (the device run carries .whl):
#                    bash bench/gpu_levers.sh                 # one JSON per variant in $OUT (else a temporary folder)
#                    bash bench/gpu_levers.sh --batch 256     # any other gpu_check.py arguments go to every run
#
# GPU_LEVERS_LIMIT_S (default 110) cuts each variant's run. The first gets GPU_LEVERS_FIRST_LIMIT_S (default 200):
# it creates the state and compiles cold (19 s + 80 s on one H100), fills XLA's autotuning cache for the
# convolutions the others share, and the torch step rides with it.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$(mktemp -d)}"
cache="$(mktemp -d)"
limit="${GPU_LEVERS_LIMIT_S:-110}"
first_limit="${GPU_LEVERS_FIRST_LIMIT_S:-200}"
variants=(trainer norm=fused upsample=phases "norm=fused upsample=phases")
for variant in "${variants[@]}"; do
  impls=()
  sections=jax-step:bf16
  for impl in $variant; do
    [ "$impl" = trainer ] && sections=jax-step:bf16,torch-step && continue
    impls+=(--impl "$impl")
  done
  name="levers-${variant// /+}"
  echo "=== $variant"
  GPU_CHECK_LIMIT_S=$((first_limit + 60)) bash bench/gpu_check.sh --sections "$sections" --cache-dir "$cache" \
    --total-limit "$first_limit" --out "$out/$name.json" ${impls[@]+"${impls[@]}"} "$@"
  first_limit=$limit
done
python3 - "$out" "${variants[@]}" <<'PY'
import json, os, sys

out, variants = sys.argv[1], sys.argv[2:]
print("\n== levers (bf16 train step; ratio: the trainer's step time over the variant's)")
base = None
for variant in variants:
    path = os.path.join(out, "levers-" + variant.replace(" ", "+") + ".json")
    results = json.load(open(path))["results"] if os.path.exists(path) else {}
    step = results.get("jax-step:bf16", {})
    torch = results.get("torch-step", {})
    if "step_s" not in step:
        print(f"{variant:28s} no result ({step.get('error', 'missing')})")
        continue
    base = base or step["step_s"]
    mfu = f"{step['mfu']:.1%}" if step.get("mfu") is not None else "n/a"
    print(f"{variant:28s} {step['step_s'] * 1e3:8.1f} ms/step {step['img_per_s']:9.1f} img/s  MFU {mfu:>6}  "
          f"{base / step['step_s']:.2f}x")
    if "step_s" in torch:
        print(f"{'torch':28s} {torch['step_s'] * 1e3:8.1f} ms/step {torch['img_per_s']:9.1f} img/s  "
              f"(the trainer's step: {step['img_per_s'] / torch['img_per_s']:.2f}x torch's img/s)")
print(f"results in {out}")
PY
rm -rf "$cache"
