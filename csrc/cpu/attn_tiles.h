// CPU attention: tile policy — which tile path (BLAS sgemm, oneDNN brgemm fp32 / bf16) and
// which block sizes a call uses.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/vec_utils.h"
#include <ATen/Context.h>
#include <cstdlib>
#include "cpu/attn_params.h"

namespace pyattn_cpu_attention {

using namespace pyattn_cpu;

// Tile paths: BLAS sgemm, oneDNN brgemm on fp32 tiles or on bf16 tiles, each in the forward and
// the backward. Which path the forward and the backward of a (dtype, head-dim class) use, and
// which forward block sizes, is measured at first use by pyattn/ops/cpu_tuning.py and set here
// with attention_set_tile_policy; without a setting the built-in default below applies.
// PYATTN_CPU_ATTN_BRGEMM=0 forces sgemm, =1 brgemm even for few query rows (tests).
enum class TileKind { kSgemm = 0, kBrgemmF32 = 1, kBrgemmBF16 = 2 };

// Query rows per kv head (GQA group x longest query sequence) below which packing K/V for brgemm
// costs more than it saves (decoding: one query per sequence): those calls always take sgemm.
constexpr int64_t kMinBrgemmRows = 128;

int64_t query_rows_per_kv_head(const Setup& st) {
  int64_t max_nq = 0;
  for (const auto& s : st.seqs) max_nq = std::max(max_nq, s.nq);
  return max_nq * (st.p.H / st.p.Hkv);
}

// A measured choice: forward and backward paths (-1 = default) and dense forward block sizes
// (0 = default).
struct TilePolicy {
  int64_t path = -1, fbq = 0, fbk = 0, bpath = -1;
};

inline int64_t dtype_slot(at::ScalarType dt) { return dt == at::kFloat ? 0 : dt == at::kBFloat16 ? 1 : 2; }
inline int64_t head_dim_class(int64_t D) { return D <= 64 ? 0 : 1; }

inline TilePolicy& tile_policy(at::ScalarType dt, int64_t D) {
  static TilePolicy table[3][2];
  return table[dtype_slot(dt)][head_dim_class(D)];
}

// Paths this build and this CPU can run (bit i = TileKind i).
inline int64_t available_tile_paths() {
  int64_t m = 1 << int(TileKind::kSgemm);
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
  if (at::globalContext().userEnabledMkldnn()) {
    m |= 1 << int(TileKind::kBrgemmF32);
    if (__builtin_cpu_supports("avx512bf16")) m |= 1 << int(TileKind::kBrgemmBF16);
  }
#endif
  return m;
}

TileKind default_tile_kind(at::ScalarType dtype) {
  const int64_t avail = available_tile_paths();
  if (dtype == at::kBFloat16 && (avail >> int(TileKind::kBrgemmBF16) & 1)) return TileKind::kBrgemmBF16;
  if (avail >> int(TileKind::kBrgemmF32) & 1) return TileKind::kBrgemmF32;
  return TileKind::kSgemm;
}

TileKind tile_kind(at::ScalarType dtype, int64_t rows_per_kv_head, int64_t D, bool backward = false) {
  const char* env = std::getenv("PYATTN_CPU_ATTN_BRGEMM");  // "0": never, "1": whatever the size
  if (env != nullptr && env[0] == '0') return TileKind::kSgemm;
  const bool force_brgemm = env != nullptr && env[0] == '1';
  if (rows_per_kv_head < kMinBrgemmRows && !force_brgemm) return TileKind::kSgemm;
  const int64_t avail = available_tile_paths();  // oneDNN off (torch.backends.mkldnn) -> sgemm only
  const TilePolicy& tp = tile_policy(dtype, D);
  const int64_t path = backward ? tp.bpath : tp.path;
  if (!force_brgemm && path >= 0 && (avail >> path & 1)) {
    const auto k = static_cast<TileKind>(path);
    if (k != TileKind::kBrgemmBF16 || dtype == at::kBFloat16) return k;
  }
  return default_tile_kind(dtype);
}
}  // namespace pyattn_cpu_attention
