#!/usr/bin/env bash
# Build the C++ CPU kernels with AddressSanitizer + UndefinedBehaviorSanitizer and run the CPU tests
# under them. Usage: scripts/sanitize.sh [--quick] [extra pytest args]
#   --quick   the rms_norm and glu tests plus one attention/lsh/decode smoke subset
# The sanitized builds get their own cache entries (the flags are part of the build digest), in
# PYATTN_CACHE_DIR (default: a sanitize/ folder next to the normal cache).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi

cxx="${CXX:-c++}"
libasan="$("$cxx" -print-file-name=libasan.so)"
libubsan="$("$cxx" -print-file-name=libubsan.so)"
if [ ! -e "$libasan" ]; then
  echo "sanitize.sh: libasan not found for $cxx" >&2
  exit 2
fi

export PYATTN_EXTRA_CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
export PYATTN_EXTRA_LDFLAGS="-fsanitize=address,undefined"
export PYATTN_CACHE_DIR="${PYATTN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pyattn-sanitize}"
# Python itself is not built with ASan: do not report its (intended) leaks; abort on the first error
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# only the cpu backend: the Triton interpreter and the reference add nothing to check here
if [ "$quick" = 1 ]; then
  tests=(tests/test_rms_norm.py tests/test_glu.py)
  select=(-k "cpu and not compile and not opcheck")
else
  tests=(tests/test_rms_norm.py tests/test_glu.py tests/test_attention.py tests/test_varlen.py tests/test_sdpa.py
         tests/test_block_sparse.py tests/test_lsh.py tests/test_decode.py)
  select=(-k "not triton")
fi
echo "== sanitized CPU tests (cache: $PYATTN_CACHE_DIR): ${tests[*]}"
LD_PRELOAD="$libasan $libubsan" python -m pytest -q -x -p no:cacheprovider -m "not slow and not gpu" \
  "${select[@]}" "${tests[@]}" "$@"
