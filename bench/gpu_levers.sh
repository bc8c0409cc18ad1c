#!/usr/bin/env bash
# The GPU levers prepared on a CPU, measured against the trainer's step on one machine in one call (at most 9
# minutes: the limits below; on one H200 the last three variants took 60-90 s each): the bf16 step as the trainer
# runs it, then with `--impl norm=fused` (GroupNorm + SiLU with a hand-written backward pass), `--impl
# upsample=phases` (Upsample2D as four 2x2 convolutions) and both; torch's step once. Every run goes through
# gpu_check.sh, so they share one JAX compilation cache and XLA's autotuning results, and the state's init program
# and the unchanged convolutions compile once.
#
# Here, once:        bash ../shared/gpu/fetch_wheels.sh portpicker array-record
# On the GPU machine (the device run carries .whl):
#                    bash bench/gpu_levers.sh                 # one JSON per variant in $OUT (else a temporary folder)
#                    bash bench/gpu_levers.sh --batch 256     # any other gpu_check.py arguments go to every run
#   GPU_LEVERS_VARIANTS="trainer;norm=fused;set:grad_norm_reduction=concat" bash bench/gpu_levers.sh   # other variants
#
# A variant is words: `trainer` (the step as the trainer builds it; torch's step rides with it), KIND=NAME (an
# `--impl`), set:FIELD=VALUE (a `--set`: a config field, both sides) or batch:N. Each variant's JSON is
# levers-<variant>.json with every character but letters, digits, '.', '_' and '-' as '_' (files the device
# tool brings back from $OUT must be named so).
#
# GPU_LEVERS_LIMIT_S (default 110) cuts each variant's run. The first gets GPU_LEVERS_FIRST_LIMIT_S (default 200):
# it creates the state and compiles cold (19 s + 80 s on one H100), fills XLA's autotuning cache for the
# convolutions the others share, and the torch step rides with it.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
cache="$(mktemp -d)"
limit="${GPU_LEVERS_LIMIT_S:-110}"
first_limit="${GPU_LEVERS_FIRST_LIMIT_S:-200}"
IFS=';' read -r -a variants <<< "${GPU_LEVERS_VARIANTS:-trainer;norm=fused;upsample=phases;norm=fused upsample=phases}"
runs=()  # "variant<TAB>its JSON file", for the table
for variant in "${variants[@]}"; do
  extra=()
  sections=jax-step:bf16
  for word in $variant; do
    case "$word" in
      trainer) sections=jax-step:bf16,torch-step ;;
      set:*) extra+=(--set "${word#set:}") ;;
      batch:*) extra+=(--batch "${word#batch:}") ;;
      *) extra+=(--impl "$word") ;;
    esac
  done
  name="levers-${variant// /+}"
  file="$out/${name//[^A-Za-z0-9._-]/_}.json"
  runs+=("$variant"$'\t'"$file")
  echo "=== $variant"
  GPU_CHECK_LIMIT_S=$((first_limit + 60)) bash bench/gpu_check.sh --sections "$sections" --cache-dir "$cache" \
    --total-limit "$first_limit" --out "$file" ${extra[@]+"${extra[@]}"} "$@"
  first_limit=$limit
done
python3 - "$out" "${runs[@]}" <<'PY'
import json, os, sys

out, runs = sys.argv[1], [run.split("\t") for run in sys.argv[2:]]
print("\n== levers (bf16 train step; ratio: the variant's img/s over the first's)")
base = None
width = max(28, *(len(variant) for variant, _ in runs))
for variant, path in runs:
    results = json.load(open(path))["results"] if os.path.exists(path) else {}
    step = results.get("jax-step:bf16", {})
    torch = results.get("torch-step", {})
    if "step_s" not in step:
        print(f"{variant:{width}s} no result ({step.get('error', 'missing')})")
        continue
    base = base or step["img_per_s"]
    mfu = f"{step['mfu']:.1%}" if step.get("mfu") is not None else "n/a"
    print(f"{variant:{width}s} {step['step_s'] * 1e3:8.1f} ms/step {step['img_per_s']:9.1f} img/s  MFU {mfu:>6}  "
          f"{step['img_per_s'] / base:.2f}x")
    if "step_s" in torch:
        print(f"{'torch':{width}s} {torch['step_s'] * 1e3:8.1f} ms/step {torch['img_per_s']:9.1f} img/s  "
              f"(the trainer's step: {step['img_per_s'] / torch['img_per_s']:.2f}x torch's img/s)")
print(f"results in {out}")
PY
rm -rf "$cache"
