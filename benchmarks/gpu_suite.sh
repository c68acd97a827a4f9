#!/usr/bin/env bash
# One call on a bare CUDA machine produces every GPU result of pyattn inside 8 minutes:
#   bash benchmarks/gpu_suite.sh OUT_DIR [--dry-run]
# Needs python3 with torch, triton, ninja, pytest (transformers optional) and nvcc; no network.
# Steps, each with its own timeout inside the overall budget (PYATTN_SUITE_BUDGET, default 470 s):
#   env      GPU, driver, versions (printed first)
#   install  pip install --no-build-isolation --no-deps -e . (else: run from the checkout)
#   build    CUDA_HOME from the real toolkit (nvcc --dryrun's _HERE_, through any wrapper script),
#            the CUDA extension built verbosely into a temporary PYATTN_CACHE_DIR
#   tests    the gpu-marked tests (multi-block correctness of every backend and op)
#   bench    python3 -m pyattn.bench --quick --device cuda, once per backend (triton, cuda) vs SDPA
#   targets  bf16 D=128 N=4096/8192 forward and backward against SDPA and the measured matmul peak
# Writes at most 8 files to OUT_DIR (suite.log, environment.txt, build.log, tests.log,
# bench_triton.csv, bench_cuda.csv, bench.md, targets.csv); build outputs stay in a temp folder.
# Exits non-zero when any step failed. --dry-run runs the same logic on a CPU machine with the GPU
# commands replaced by cheap stand-ins (CI checks it: tests/test_gpu_suite.py).
set -uo pipefail

OUT="${1:?usage: gpu_suite.sh OUT_DIR [--dry-run]}"
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
export DRY
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUDGET="${PYATTN_SUITE_BUDGET:-470}"
START=$(date +%s)
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pyattn-gpu-suite.XXXXXX")"
LOG="$OUT/suite.log"
: > "$LOG"
FAILED=()
CREATED_LINK=""
cd "$ROOT" || exit 2

cleanup() {
  [ -n "$CREATED_LINK" ] && rm -f "$CREATED_LINK"
  rm -rf "$WORK"
}
trap cleanup EXIT

say() { echo "$*" | tee -a "$LOG"; }
remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME TIMEOUT_S LOGFILE CMD...: runs CMD with min(TIMEOUT_S, time left), output to LOGFILE,
# the tail into suite.log; a non-zero status or a timeout marks the step failed.
step() {
  local name="$1" limit="$2" logfile="$3"
  shift 3
  local left
  left=$(remaining)
  if [ "$left" -lt 10 ]; then
    say "[$name] SKIPPED: suite budget of ${BUDGET}s used up"
    FAILED+=("$name(no time)")
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "[$name] start (timeout ${limit}s): $*"
  local t0 rc
  t0=$(date +%s)
  if declare -F "$1" > /dev/null; then  # a shell function of this script: run it in a child bash
    timeout --kill-after=10 "$limit" bash -c "$(declare -f "$1"); $(printf '%q ' "$@")" >> "$logfile" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" >> "$logfile" 2>&1
  fi
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then
    say "[$name] ok in ${dt}s"
  else
    [ $rc -eq 124 ] && say "[$name] TIMED OUT after ${dt}s" || say "[$name] FAILED (exit $rc) after ${dt}s"
    tail -n 25 "$logfile" | sed "s/^/[$name] | /" | tee -a "$LOG"
    FAILED+=("$name")
  fi
  return $rc
}

# ---------------------------------------------------------------------------------------- env
ENVF="$OUT/environment.txt"
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "host: $(hostname) ($(nproc) CPUs)"
  if [ $DRY -eq 1 ]; then
    echo "gpu: (dry run: nvidia-smi not called)"
  else
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv,noheader \
      2>&1 || echo "gpu: nvidia-smi failed"
  fi
  python3 - <<'PY'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name} sm_{p.major}{p.minor} {p.multi_processor_count} SMs {p.total_memory / 2**30:.0f} GiB")
for mod in ("triton", "ninja", "pytest", "transformers", "flash_attn", "xformers"):
    try:
        print(mod, getattr(importlib.import_module(mod), "__version__", "?"))
    except Exception as exc:
        print(mod, "not available:", type(exc).__name__)
PY
  (nvcc --version 2>&1 | tail -n 2) || echo "nvcc: not found"
} > "$ENVF" 2>&1
tee -a "$LOG" < "$ENVF"

# ------------------------------------------------------------------------------------ install
install_pyattn() {
  if [ $DRY -eq 1 ]; then
    echo "dry run: not installing (would run python3 -m pip install --no-build-isolation --no-deps -e .);" \
      "exercising the checkout fallback"
    return 1
  fi
  python3 -m pip install --no-build-isolation --no-deps --no-index -e . 2>&1
}
n_failed=${#FAILED[@]}
if step install 45 "$WORK/install.log" install_pyattn && python3 -c "import pyattn.kernels" 2>/dev/null; then
  say "[install] pyattn installed (editable)"
else
  # not a failure: the checkout works once pyattn.kernels (setup.py maps kernels/ there) exists
  FAILED=("${FAILED[@]:0:$n_failed}")
  if [ ! -e pyattn/kernels ]; then
    ln -s ../kernels pyattn/kernels && CREATED_LINK="$ROOT/pyattn/kernels"
  fi
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  say "[install] running from the checkout (PYTHONPATH=$ROOT)"
fi

# --------------------------------------------------------------------------------- CUDA_HOME
# The real toolkit: nvcc --dryrun names its own bin folder (_HERE_) even when `nvcc` on PATH is a
# wrapper script elsewhere; the toolkit root is the folder above it that has include/cuda_runtime.h.
toolkit_of() {
  local dir="$1"
  dir="$(readlink -f "$dir" 2>/dev/null || echo "$dir")"
  [ -f "$dir/include/cuda_runtime.h" ] && { echo "$dir"; return 0; }
  local t
  for t in "$dir"/targets/*/include/cuda_runtime.h; do
    [ -f "$t" ] && { echo "$dir"; return 0; }
  done
  return 1
}
resolve_cuda_home() {
  local here cand
  if [ -n "${CUDA_HOME:-}" ] && toolkit_of "$CUDA_HOME"; then return 0; fi
  if command -v nvcc > /dev/null; then
    here="$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)"
    [ -n "$here" ] && toolkit_of "$here/.." && return 0
    cand="$(dirname "$(readlink -f "$(command -v nvcc)")")/.."
    toolkit_of "$cand" && return 0
  fi
  for cand in /usr/local/cuda /usr/local/cuda-* /opt/cuda; do
    toolkit_of "$cand" && return 0
  done
  return 1
}
if CUDA_HOME_FOUND="$(resolve_cuda_home)"; then
  export CUDA_HOME="$CUDA_HOME_FOUND" CUDA_PATH="$CUDA_HOME_FOUND"
  export PATH="$CUDA_HOME/bin:$PATH"
  say "CUDA_HOME=$CUDA_HOME"
else
  say "CUDA_HOME: no CUDA toolkit with include/cuda_runtime.h found"
  FAILED+=("cuda_home")
fi

# -------------------------------------------------------------------------------------- build
export PYATTN_CACHE_DIR="$WORK/build-cache" PYATTN_VERBOSE_BUILD=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
BUILD_LOG="$OUT/build.log"
build_cuda() {
  python3 - "$DRY" <<'PY'
import sys
import pyattn
from pyattn import _build
dry = sys.argv[1] == "1"
if dry:
    print("dry run: would build the CUDA extension; sources:", sorted(p.name for p in (_build.csrc_dir() / "cuda").glob("*.cu")))
    sys.exit(0)
reason = _build.load_cuda_extension()
print("cuda extension:", reason or "built and loaded")
for fam in ("attention", "rms_norm", "glu"):
    print(fam, pyattn.backend_status(fam, "cuda"))
sys.exit(1 if reason else 0)
PY
}
step build 130 "$BUILD_LOG" build_cuda

# -------------------------------------------------------------------------------------- tests
TESTS_LOG="$OUT/tests.log"
if [ $DRY -eq 1 ]; then
  # the same selection, collected only: the gpu-marked multi-block tests exist and import
  step tests 120 "$TESTS_LOG" python3 -m pytest -q -p no:cacheprovider -m gpu --collect-only tests/test_gpu_correctness.py
  grep -q "tests collected\|test.* collected" "$TESTS_LOG" || { say "[tests] nothing collected"; FAILED+=("tests-collect"); }
else
  step tests 140 "$TESTS_LOG" python3 -m pytest -q -p no:cacheprovider -m gpu --durations=10 tests/
fi

# -------------------------------------------------------------------------------------- bench
BENCH_MD="$OUT/bench.md"
: > "$BENCH_MD"
for backend in triton cuda; do
  dest="$WORK/bench_$backend"
  if [ $DRY -eq 1 ] && [ $backend = cuda ]; then
    say "[bench-cuda] dry run: same plumbing as bench-triton, not repeated"
    continue
  elif [ $DRY -eq 1 ]; then
    # cheap stand-in with the same plumbing: CPU, one op, the cpu kernel backend, tiny budget
    step "bench-$backend" 120 "$WORK/bench_$backend.log" env PYATTN_BACKEND=cpu \
      python3 -m pyattn.bench --quick --device cpu --ops rms_norm --peers eager --budget 0.01 --out "$dest"
  else
    step "bench-$backend" 55 "$WORK/bench_$backend.log" env PYATTN_BACKEND=$backend \
      python3 -m pyattn.bench --quick --device cuda --ops attention,masks,rms_norm,glu --peers sdpa,eager \
      --budget 0.2 --out "$dest"
  fi
  cat "$WORK/bench_$backend.log" >> "$LOG"
  [ -f "$dest/results.csv" ] && cp "$dest/results.csv" "$OUT/bench_$backend.csv"
  if [ -f "$dest/results.md" ]; then
    { echo "## backend: $backend"; echo; cat "$dest/results.md"; echo; } >> "$BENCH_MD"
  fi
done

# ------------------------------------------------------------------------------------ targets
TARGET_ARGS=(--out "$OUT/targets.csv" --markdown "$BENCH_MD")
[ $DRY -eq 1 ] && TARGET_ARGS+=(--dry-run)
step targets 45 "$WORK/targets.log" python3 benchmarks/gpu_targets.py "${TARGET_ARGS[@]}"
cat "$WORK/targets.log" >> "$LOG"

# ------------------------------------------------------------------------------------ summary
n_files=$(find "$OUT" -type f | wc -l)
if [ "$n_files" -gt 8 ]; then
  say "OUT holds $n_files files (limit 8): $(find "$OUT" -type f -printf '%f ')"
  FAILED+=("out-files")
fi
say "suite finished in $(( $(date +%s) - START ))s; files: $(find "$OUT" -type f -printf '%f ' | sort)"
if [ ${#FAILED[@]} -gt 0 ]; then
  say "FAILED steps: ${FAILED[*]}"
  exit 1
fi
say "all steps passed"
exit 0
