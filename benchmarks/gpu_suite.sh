#!/usr/bin/env bash
# One call on a CUDA machine does everything: install pyattn (no deps, no build isolation: the
# machine's torch/triton are used), run the GPU tests and the static checks, run the benchmark
# suite, and write everything under the folder given as the first argument.
#   bash benchmarks/gpu_suite.sh OUT_DIR [--quick]
set -uo pipefail
OUT="${1:?usage: gpu_suite.sh OUT_DIR [--quick]}"
QUICK="${2:-}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  python -c "import triton; print('triton', triton.__version__)" 2>/dev/null
  nvcc --version | tail -1
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

python -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { echo "install failed"; tail "$OUT/install.log"; }
export PYATTN_CACHE_DIR="$OUT/.build-cache"

# build the CUDA extension once up front so that its log is kept
python - > "$OUT/cuda_build.log" 2>&1 <<'PY'
import pyattn
from pyattn import _build
print("cuda extension:", _build.load_cuda_extension() or "ok")
for fam in ("rms_norm", "attention", "glu"):
    print(fam, pyattn.backend_status(fam, "cuda"))
PY
cat "$OUT/cuda_build.log"

timeout 1500 python -m pytest -q tests/ -p no:cacheprovider > "$OUT/tests.log" 2>&1
tail -30 "$OUT/tests.log"

python -m pyattn.bench --device cuda ${QUICK} --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -60
