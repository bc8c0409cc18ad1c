#!/usr/bin/env bash
# The GPU check in one command, on a machine without a package index (about 6 minutes on one H100).
#
# Here, once:        bash ../shared/gpu/fetch_wheels.sh portpicker array-record   # grain (and what it needs), ml_collections,
#                                                                             # datasets, diffusers ... -> .whl/
# On the GPU machine (the device run carries .whl):
#                    bash bench/gpu_check.sh                  # results also in $OUT/gpu_check.json when $OUT is set
#
# Every section of bench/gpu_check.py runs in its own process under its own time limit, and prints as it goes;
# this whole script is cut at GPU_CHECK_LIMIT_S (default 360) seconds so it never overruns the 6 minutes.
# XLA_FLAGS defaults to --xla_gpu_enable_triton_gemm=false: cuBLAS for the few matrix products, which keeps XLA's
# autotuning (and so the compile) short; never --xla_gpu_autotune_level=0 (a 30 s step: see gpu_check.py). It also
# keeps XLA's autotuning results in one folder for all the sections and later runs on the machine
# (--xla_gpu_per_fusion_autotune_cache_dir): on one H100 the four-steps-per-call program compiled in 44 s after
# the one-step program's 76 s had filled it (2026-11-27).
# GPU_CHECK_WHEELS (default .whl) and GPU_CHECK_SITE (default .site) name the wheels' folder and the folder they
# install to; the same set of wheels is installed once per machine, not on every run.
set -uo pipefail
cd "$(dirname "$0")/.."
wheels="${GPU_CHECK_WHEELS:-.whl}"
site="${GPU_CHECK_SITE:-.site}"
path="$PWD"  # the sections' import path ahead of PYTHONPATH: the project, and the installed wheels first
if compgen -G "$wheels/*.whl" > /dev/null; then
  # The wheels are for the device's Python (3.12); where they do not install, go on with what is installed:
  # each section reports what it misses. Installed once per machine: the same wheels found installed by an
  # earlier run (gpu_levers.sh runs this script per variant) are not installed again, since pip would print a
  # warning for every existing folder and fill the device tool's output tail with them.
  listed="$(cd "$wheels" && ls -- *.whl | sort)"
  if [ "$(cat "$site/.installed-wheels" 2>/dev/null)" = "$listed" ]; then
    echo "gpu_check.sh: $wheels/*.whl already installed in $site"
    path="$(cd "$site" && pwd):$path"
  elif python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$wheels"/*.whl; then
    printf '%s\n' "$listed" > "$site/.installed-wheels"
    path="$(cd "$site" && pwd):$path"
  else
    echo "gpu_check.sh: installing $wheels/*.whl failed; using what is installed" >&2
  fi
else
  echo "gpu_check.sh: no $wheels/ here (run bash ../shared/gpu/fetch_wheels.sh portpicker array-record and carry .whl); using what is installed"
fi
export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}"
autotune="${GPU_CHECK_AUTOTUNE_DIR:-${TMPDIR:-/tmp}/gpu_check_autotune}"
export XLA_FLAGS="${XLA_FLAGS---xla_gpu_enable_triton_gemm=false --xla_gpu_per_fusion_autotune_cache_dir=$autotune}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
# -k: a driver that ignores SIGTERM is killed 5 s later; the sections' children die with their own limits.
exec timeout -k 5 "${GPU_CHECK_LIMIT_S:-360}" python3 -u bench/gpu_check.py "$@"
