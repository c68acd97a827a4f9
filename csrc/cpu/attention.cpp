// pyattn CPU attention engine: FlashAttention-2 style forward and backward.
//
// Semantics: pyattn/reference/attention.py (scores, band/causal/window, alibi, bias,
// key padding, varlen, dropout hash, lse convention, backward formulas).
//
// Design
//  * All arithmetic is fp32. fp32 inputs are used in place through their strides (only the last
//    dim must be unit-stride); fp16/bf16 inputs are converted to fp32 once on entry (O(N*D)), which
//    on CPUs without AVX512-BF16/AMX is also the fastest way to feed the tile products.
//  * Tile products go through the BLAS sgemm that libtorch_cpu links (MKL/OpenBLAS), see sgemm().
//    The forward on AVX512 CPUs uses ATen's oneDNN brgemm micro-kernel instead (10-15% faster than
//    sgemm on attention tiles), with K^T packed once per call. For bf16 inputs on CPUs with
//    AVX512-BF16 the tiles themselves are bf16 (about twice the fp32 rate): K^T and V are packed
//    into VNNI pairs and the probabilities are rounded to bf16 for P.V, as in GPU FlashAttention;
//    accumulation stays fp32.
//  * ONE templated tile routine (score_tile) builds the masked score tile for both passes. The
//    kernels are specialised at compile time on <bias dtype | none, alibi, key padding, dropout>;
//    causal/window is a runtime band whose per-element masking only runs on blocks that straddle
//    the band edge. Key (forward) / query (backward) blocks outside the band are never visited.
//  * Varlen and dense batches share one "sequence" descriptor list, so there is no varlen variant.
//  * Forward: tasks (head, sequence, query block) pulled dynamically by at::parallel_for workers;
//    online softmax; saves out + lse.
//  * Backward: tasks (sequence, kv head, key-block class c), pulled the same way; each task owns the dk/dv
//    rows of its key blocks (summing the GQA group in-task) and accumulates dq into a private
//    buffer of its class c (c < C, C = 1 unless more parallelism is needed), reduced at the end in
//    a fixed order -> deterministic for a given thread count, no atomics, no races.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/native/TransposeType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>
#include "cpu/alloc.h"

namespace pyattn_cpu_attention {

using fVec = at::vec::Vectorized<float>;
using at::native::TransposeType;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------------
// small helpers
// ------------------------------------------------------------------------------------------
inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Column-major BLAS sgemm. at::native::cpublas::gemm<float> is not exported by libtorch_cpu, so
// we call the Fortran BLAS symbol that libtorch_cpu links (MKL / OpenBLAS), declared weak so that
// a torch build without it still loads and falls back to a plain loop.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

inline void sgemm_fallback(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                           const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                           float* c, int64_t ldc) {
  for (int64_t j = 0; j < n; ++j) {
    float* cj = c + j * ldc;
    if (beta == 0.f) std::fill(cj, cj + m, 0.f);
    else if (beta != 1.f) for (int64_t i = 0; i < m; ++i) cj[i] *= beta;
    for (int64_t l = 0; l < k; ++l) {
      const float bv = alpha * (tb ? b[l * ldb + j] : b[j * ldb + l]);
      if (bv == 0.f) continue;
      if (!ta) {
        const float* al = a + l * lda;
        for (int64_t i = 0; i < m; ++i) cj[i] += bv * al[i];
      } else {
        for (int64_t i = 0; i < m; ++i) cj[i] += bv * a[i * lda + l];
      }
    }
  }
}

inline void sgemm(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, float alpha,
                  const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                  int64_t ldc) {
  const bool at_ = ta != TransposeType::NoTranspose;
  const bool bt_ = tb != TransposeType::NoTranspose;
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < m; ++i) c[j * ldc + i] = beta == 0.f ? 0.f : beta * c[j * ldc + i];
    return;
  }
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  if (sgemm_ != nullptr && lda <= kIntMax && ldb <= kIntMax && ldc <= kIntMax) {
    const char cta = at_ ? 'T' : 'N', ctb = bt_ ? 'T' : 'N';
    const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
    const int ilda = static_cast<int>(std::max<int64_t>(lda, 1));
    const int ildb = static_cast<int>(std::max<int64_t>(ldb, 1));
    const int ildc = static_cast<int>(std::max<int64_t>(ldc, 1));
    sgemm_(&cta, &ctb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  } else {
    sgemm_fallback(at_, bt_, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

// max that propagates NaN (std::max drops a NaN second argument): a NaN score makes its row NaN
inline float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// NaN-propagating row maximum (at::vec::maximum propagates NaN too)
inline float row_max(const float* x, int64_t n) {
  int64_t c = 0;
  float m = kNegInf;
  if (n >= fVec::size()) {
    fVec vm(kNegInf);
    for (; c + fVec::size() <= n; c += fVec::size()) vm = at::vec::maximum(vm, fVec::loadu(x + c));
    m = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; c < n; ++c) m = nan_max(m, x[c]);
  return m;
}

// exp(t) for t <= ~88, exactly 0 for t < -87.3 (so -inf, i.e. masked scores, give 0).
// Cephes expf polynomial (~1 ulp) in at::vec ops, forced inline: GCC keeps at::vec's exp_u20 as an
// out-of-line call per vector, which cost ~10% of the forward.
__attribute__((always_inline)) inline fVec vexp(const fVec& t) {
  using iVec = at::vec::Vectorized<int32_t>;
  const fVec lo(-87.3f);
  const fVec tc = at::vec::minimum(at::vec::maximum(t, lo), fVec(88.f));
  const fVec fn = (tc * fVec(1.44269504088896341f)).round();
  fVec r = at::vec::fmadd(fn, fVec(-0.693359375f), tc);
  r = at::vec::fmadd(fn, fVec(2.12194440e-4f), r);
  fVec q(1.9875691500e-4f);
  q = at::vec::fmadd(q, r, fVec(1.3981999507e-3f));
  q = at::vec::fmadd(q, r, fVec(8.3334519073e-3f));
  q = at::vec::fmadd(q, r, fVec(4.1665795894e-2f));
  q = at::vec::fmadd(q, r, fVec(1.6666665459e-1f));
  q = at::vec::fmadd(q, r, fVec(5.0000001201e-1f));
  const fVec e = at::vec::fmadd(q, r * r, r + fVec(1.f));
  const iVec ni = (at::vec::convert_to_int_of_same_size(fn) + iVec(127)) * iVec(1 << 23);
  const fVec scale = at::vec::cast<float, int32_t>(ni);
  return fVec::blendv(e * scale, fVec(0.f), t < lo);
}

inline float row_sum(const float* x, int64_t n) {
  int64_t c = 0;
  float s = 0.f;
  if (n >= fVec::size()) {
    fVec vs(0.f);
    for (; c + fVec::size() <= n; c += fVec::size()) vs = vs + fVec::loadu(x + c);
    s = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, vs);
  }
  for (; c < n; ++c) s += x[c];
  return s;
}

// x = exp(x - m) in place
__attribute__((always_inline)) inline void exp_sub(float* x, int64_t n, float m) {
  int64_t c = 0;
  const fVec vm(m);
  for (; c + fVec::size() <= n; c += fVec::size()) vexp(fVec::loadu(x + c) - vm).store(x + c);
  if (c < n) {
    const int64_t rem = n - c;
    vexp(fVec::loadu(x + c, rem) - vm).store(x + c, rem);
  }
}

// x = exp(x - m) in place, returns the sum
inline float exp_sub_sum(float* x, int64_t n, float m) {
  exp_sub(x, n, m);
  return row_sum(x, n);
}

inline void scale_row(float* x, int64_t n, float a) {
  int64_t c = 0;
  const fVec va(a);
  for (; c + fVec::size() <= n; c += fVec::size()) (fVec::loadu(x + c) * va).store(x + c);
  for (; c < n; ++c) x[c] *= a;
}

// row[c] = keep(i, j0 + c) ? row[c] * mult : 0
inline void apply_keep(float* row, int64_t n, uint32_t hrow, uint32_t j0, uint32_t thr, float mult) {
  for (int64_t c = 0; c < n; ++c) {
    const uint32_t r = hash32(hrow ^ (j0 + static_cast<uint32_t>(c)));
    row[c] = ((r >> 8) >= thr) ? row[c] * mult : 0.f;
  }
}

// ------------------------------------------------------------------------------------------
// problem description
// ------------------------------------------------------------------------------------------
inline int64_t round_up_even(int64_t n) { return (n + 1) & ~int64_t(1); }

// dst(rows x ld_dst, bf16) = src(rows x n, fp32, row stride ld_src), columns [n, ld_dst) zeroed
inline void load_bf16_rows(const float* src, int64_t ld_src, int64_t rows, int64_t n, int64_t ld_dst,
                           c10::BFloat16* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    at::vec::convert(src + r * ld_src, dst + r * ld_dst, n);
    std::fill(dst + r * ld_dst + n, dst + (r + 1) * ld_dst, c10::BFloat16(0.f));
  }
}

// dst = VNNI pairs of the rows of src (rows x n bf16, row stride ld_src): dst[r/2][c][r%2];
// the partner of an odd last row is zero
inline void pair_rows_bf16(const c10::BFloat16* src, int64_t ld_src, int64_t rows, int64_t n, c10::BFloat16* dst) {
  const auto* s16 = reinterpret_cast<const uint16_t*>(src);
  auto* d32 = reinterpret_cast<uint32_t*>(dst);
  for (int64_t r = 0; r < rows; r += 2) {
    const uint16_t* a = s16 + r * ld_src;
    uint32_t* o = d32 + (r >> 1) * n;
    if (r + 1 < rows) {
      const uint16_t* b = a + ld_src;
      for (int64_t c = 0; c < n; ++c) o[c] = uint32_t(a[c]) | (uint32_t(b[c]) << 16);
    } else {
      for (int64_t c = 0; c < n; ++c) o[c] = uint32_t(a[c]);
    }
  }
}

// dst(n x ld_dst, bf16) = src(rows x n, fp32)^T, columns [rows, ld_dst) zeroed
inline void load_bf16_transposed(const float* src, int64_t ld_src, int64_t rows, int64_t n, int64_t ld_dst,
                                 c10::BFloat16* dst) {
  for (int64_t c = 0; c < n; ++c) {
    c10::BFloat16* d = dst + c * ld_dst;
    for (int64_t r = 0; r < rows; ++r) d[r] = c10::BFloat16(src[r * ld_src + c]);
    std::fill(d + rows, d + ld_dst, c10::BFloat16(0.f));
  }
}

struct Seq {
  int64_t tb;   // batch index into the tensors (0 in varlen mode)
  int64_t lb;   // logical batch index "b" of the contract (sequence index in varlen mode)
  int64_t q0;   // first query row in the tensors
  int64_t k0;   // first key row in the tensors
  int64_t nq, nk, off;
};

struct Params {
  const float* q;
  int64_t q_sb, q_sh, q_sn;
  const float* k;
  int64_t k_sb, k_sh, k_sn;
  const float* v;
  int64_t v_sb, v_sh, v_sn;
  int64_t B, H, Hkv, D, NqT, NkT;
  float scale;
  int64_t wl, wr;
  const void* bias = nullptr;
  int64_t bias_sb = 0, bias_sh = 0, bias_sq = 0, bias_sk = 0;
  const float* slopes = nullptr;
  int64_t sl_sb = 0, sl_sh = 0, sl_nb = 1;
  const bool* kpm = nullptr;
  int64_t kpm_sb = 0, kpm_sk = 0;
  float rp = 1.f;  // 1 / (1 - p)
  uint32_t thr = 0, seed = 0;
  // tile sizes (rows of the query block / key block) of the forward and backward passes
  int64_t fbq = 64, fbk = 256, bbq = 64, bbk = 128;
  // brgemm forward tiles. Per (sequence, kv head) slab at slab_off[seq * Hkv + hk]:
  //  fp32 (kt_f32 != nullptr): K^T as (D, nk_even);
  //  bf16 (kt_vnni != nullptr): K^T as (Dp/2, nk_even, 2) and V as (nk_even/2, D, 2) VNNI pairs,
  //  Dp = D rounded up to even, zero padded
  const float* kt_f32 = nullptr;
  const c10::BFloat16* kt_vnni = nullptr;
  const c10::BFloat16* v_vnni = nullptr;
  // bf16 backward (kt_vnni, vt_vnni, k_vnni != nullptr): also V^T as (Dp/2, nk_even, 2) and
  // K as (nk_even/2, D, 2)
  const c10::BFloat16* vt_vnni = nullptr;
  const c10::BFloat16* k_vnni = nullptr;
  const int64_t* slab_off = nullptr;
  int64_t Dp = 0;
  // Explicit block schedule (block-sparse attention; see pyattn/block_mask.py). Without one
  // (full_kv_num == nullptr) a query tile visits the key range of the band [wl, wr], as one run.
  // Lists per (b or 0, h or 0, block): counts (Bm, Hm, nb) and sorted indices (Bm, Hm, nb, nb_other);
  // "part" blocks apply the element mask `bits` (uint8 (Bm, Hm, Nq, ceil(Nk / 8)), bit j % 8 of
  // byte j / 8), "full" blocks skip it. Causal/window band and key padding apply on top.
  const int32_t* full_kv_num = nullptr;
  const int32_t* full_kv_idx = nullptr;
  const int32_t* part_kv_num = nullptr;
  const int32_t* part_kv_idx = nullptr;
  const int32_t* full_q_num = nullptr;
  const int32_t* full_q_idx = nullptr;
  const int32_t* part_q_num = nullptr;
  const int32_t* part_q_idx = nullptr;
  int64_t sch_B = 1, sch_H = 1, nqb = 0, nkb = 0, blk_q = 0, blk_k = 0;
  const uint8_t* bits = nullptr;
  int64_t bits_sb = 0, bits_sh = 0, bits_sq = 0;
};

// (b, h) row of the schedule's (Bm, Hm) leading dims
inline int64_t sched_row(const Params& p, int64_t b, int64_t h) {
  return (p.sch_B == 1 ? 0 : b) * p.sch_H + (p.sch_H == 1 ? 0 : h);
}

// Calls f(start, len, partial) for the runs of consecutive listed blocks (block size `blk`, at most
// `cap` elements per run, clipped to `n`): partial blocks first, then full ones. Merging neighbours
// gives the tile products the width of the dense path (a sliding window becomes one run).
template <typename F>
inline void for_each_block_run(const int32_t* part_idx, int64_t npart, const int32_t* full_idx, int64_t nfull,
                               int64_t blk, int64_t cap, int64_t n, F&& f) {
  auto walk = [&](const int32_t* idx, int64_t cnt, bool partial) {
    for (int64_t a = 0; a < cnt;) {
      int64_t b = a + 1;
      while (b < cnt && idx[b] == idx[b - 1] + 1 && (b - a + 1) * blk <= cap) ++b;
      const int64_t start = static_cast<int64_t>(idx[a]) * blk;
      const int64_t end = std::min(n, static_cast<int64_t>(idx[b - 1] + 1) * blk);
      if (end > start) f(start, end - start, partial);
      a = b;
    }
  };
  walk(part_idx, npart, true);
  walk(full_idx, nfull, false);
}

// S(bq x bk, row stride ldS) = -inf where the element mask bit of (i0 + r, j0 + c) is clear
inline void apply_mask_bits(const Params& p, const Seq& s, int64_t h, float* S, int64_t ldS, int64_t i0, int64_t bq,
                            int64_t j0, int64_t bk) {
  const uint8_t* base = p.bits + (p.sch_B == 1 ? 0 : s.tb) * p.bits_sb + (p.sch_H == 1 ? 0 : h) * p.bits_sh;
  for (int64_t r = 0; r < bq; ++r) {
    const uint8_t* row = base + (i0 + r) * p.bits_sq;
    float* srow = S + r * ldS;
    for (int64_t c = 0; c < bk; ++c) {
      const int64_t j = j0 + c;
      if (!((row[j >> 3] >> (j & 7)) & 1)) srow[c] = kNegInf;
    }
  }
}

inline float slope_of(const Params& p, const Seq& s, int64_t h) {
  const int64_t b = (p.sl_nb == 1) ? 0 : s.lb;
  return p.slopes[b * p.sl_sb + h * p.sl_sh];
}
inline uint32_t drop_base(const Params& p, const Seq& s, int64_t h) {
  return hash32(p.seed + static_cast<uint32_t>(s.lb * p.H + h) * 0x9E3779B9U);
}
// additive key padding row for keys [j0, j0 + n) of sequence s
inline void fill_padadd(const Params& p, const Seq& s, int64_t j0, int64_t n, float* dst) {
  const bool* base = p.kpm + s.tb * p.kpm_sb;
  for (int64_t c = 0; c < n; ++c) dst[c] = base[(j0 + c) * p.kpm_sk] ? 0.f : kNegInf;
}
// true if every (i, j) of the tile is inside the band
inline bool tile_inside_band(const Params& p, const Seq& s, int64_t i0, int64_t bq, int64_t j0,
                             int64_t bk) {
  if (p.wl >= 0 && j0 < i0 + bq - 1 + s.off - p.wl) return false;
  if (p.wr >= 0 && j0 + bk - 1 > i0 + s.off + p.wr) return false;
  return true;
}

// ------------------------------------------------------------------------------------------
// THE tile routine: S (already scale*q.k) += bias + alibi + padding, band mask -> -inf.
// ------------------------------------------------------------------------------------------
template <typename bias_t, bool ALIBI, bool PAD>
inline void score_tile(const Params& p, const Seq& s, int64_t h, float* S, int64_t ldS, int64_t i0,
                       int64_t bq, int64_t j0, int64_t bk, bool band, const float* padadd,
                       float slope) {
  const bias_t* bias_bh = nullptr;
  if constexpr (!std::is_void_v<bias_t>) {
    bias_bh = static_cast<const bias_t*>(p.bias) + s.tb * p.bias_sb + h * p.bias_sh;
  }
  for (int64_t r = 0; r < bq; ++r) {
    float* row = S + r * ldS;
    const int64_t i = i0 + r;
    if constexpr (!std::is_void_v<bias_t>) {
      const bias_t* br = bias_bh + i * p.bias_sq + j0 * p.bias_sk;
      if (p.bias_sk == 1) {
        if constexpr (std::is_same_v<bias_t, float>) {
          int64_t c = 0;
          for (; c + fVec::size() <= bk; c += fVec::size())
            (fVec::loadu(row + c) + fVec::loadu(br + c)).store(row + c);
          for (; c < bk; ++c) row[c] += br[c];
        } else {
          for (int64_t c = 0; c < bk; ++c) row[c] += static_cast<float>(br[c]);
        }
      } else if (p.bias_sk == 0) {
        const float bv = static_cast<float>(br[0]);
        for (int64_t c = 0; c < bk; ++c) row[c] += bv;
      } else {
        for (int64_t c = 0; c < bk; ++c) row[c] += static_cast<float>(br[c * p.bias_sk]);
      }
    }
    if constexpr (ALIBI) {
      const float base = static_cast<float>(i + s.off - j0);
      for (int64_t c = 0; c < bk; ++c) row[c] -= slope * std::abs(base - static_cast<float>(c));
    }
    if constexpr (PAD) {  // masks overwrite (a NaN score at a masked key stays masked)
      for (int64_t c = 0; c < bk; ++c) row[c] = padadd[c] == 0.f ? row[c] : kNegInf;
    }
    if (band) {
      // visible local columns: c in [clo, chi]
      int64_t clo = 0, chi = bk - 1;
      if (p.wl >= 0) clo = std::max<int64_t>(clo, i + s.off - p.wl - j0);
      if (p.wr >= 0) chi = std::min<int64_t>(chi, i + s.off + p.wr - j0);
      if (clo > chi) {
        std::fill(row, row + bk, kNegInf);
      } else {
        std::fill(row, row + clo, kNegInf);
        std::fill(row + chi + 1, row + bk, kNegInf);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// forward
// ------------------------------------------------------------------------------------------

struct QItem {
  int32_t seq;
  int32_t qb;
};

template <typename bias_t, bool ALIBI, bool PAD, bool DROP, bool BITS = false>
void fwd_kernel(const Params& p, const std::vector<Seq>& seqs, const std::vector<QItem>& items,
                float* out, float* lse) {
  const int64_t D = p.D;
  const int64_t G = p.H / p.Hkv;
  const int64_t nitems = static_cast<int64_t>(items.size());
  int64_t max_nk = 1;
  for (const auto& s : seqs) max_nk = std::max(max_nk, s.nk);
  const int64_t ntasks = p.H * nitems;

  // dynamic scheduling: each worker pulls the next task (robust to uneven causal work and to
  // cores shared with other processes); results do not depend on which worker ran a task
  std::atomic<int64_t> next{0};
  const int64_t nworkers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  at::parallel_for(0, nworkers, 1, [&](int64_t, int64_t) {
    std::vector<float> Sbuf(p.fbq * p.fbk), Obuf(p.fbq * D), mbuf(p.fbq), lbuf(p.fbq);
    std::vector<float> padbuf(PAD ? max_nk : 0);
    const bool bf = p.kt_vnni != nullptr;
    const bool f32b = p.kt_f32 != nullptr;
    std::vector<c10::BFloat16> Qh(bf ? p.fbq * p.Dp : 0), Ph(bf ? p.fbq * round_up_even(p.fbk) : 0);
    float* S = Sbuf.data();
    float* O = Obuf.data();
    float* m = mbuf.data();
    float* l = lbuf.data();
    for (int64_t t = next.fetch_add(1); t < ntasks; t = next.fetch_add(1)) {
      const int64_t h = t % p.H;  // item-major: consecutive tasks share the item's K/V
      const QItem it = items[t / p.H];
      const Seq& s = seqs[it.seq];
      const int64_t hk = h / G;
      const int64_t i0 = static_cast<int64_t>(it.qb) * p.fbq;
      const int64_t bq = std::min(p.fbq, s.nq - i0);
      const float* qp = p.q + s.tb * p.q_sb + h * p.q_sh + (s.q0 + i0) * p.q_sn;
      const float* kp = p.k + s.tb * p.k_sb + hk * p.k_sh + s.k0 * p.k_sn;
      const float* vp = p.v + s.tb * p.v_sb + hk * p.v_sh + s.k0 * p.v_sn;
      float* op = out + ((s.tb * p.H + h) * p.NqT + s.q0 + i0) * D;
      float* lp = lse + (s.tb * p.H + h) * p.NqT + s.q0 + i0;

      int64_t lo = 0, hi = s.nk;  // key range [lo, hi)
      if (p.wl >= 0) lo = std::max<int64_t>(lo, i0 + s.off - p.wl);
      if (p.wr >= 0) hi = std::min<int64_t>(hi, i0 + bq - 1 + s.off + p.wr + 1);
      int64_t slab = 0, nk_even = 0;
      if (bf || f32b) {
        slab = p.slab_off[it.seq * p.Hkv + hk];
        nk_even = round_up_even(s.nk);
      }
      if (bf) {
        lo &= ~int64_t(1);  // VNNI pairs start at even keys; the extra key is masked by the band
        load_bf16_rows(qp, p.q_sn, bq, D, p.Dp, Qh.data());
      }

      std::fill(m, m + bq, kNegInf);
      std::fill(l, l + bq, 0.f);
      std::fill(O, O + bq * D, 0.f);
      float slope = 0.f;
      if constexpr (ALIBI) slope = slope_of(p, s, h);
      uint32_t dbase = 0;
      if constexpr (DROP) dbase = drop_base(p, s, h);
      if constexpr (PAD) {
        if (hi > lo && p.full_kv_num == nullptr) fill_padadd(p, s, lo, hi - lo, padbuf.data());
      }

      const bool sparse = p.full_kv_num != nullptr;
      // one key tile [j0, j0 + bk); partial = the element mask bits apply
      auto key_tile = [&](int64_t j0, int64_t bk, bool partial) {
        const int64_t ldS = bk;
        if (bf) {
          // S(bq x bk) = Q(bq x Dp) . K^T(Dp x bk), then the scale
          at::native::cpublas::brgemm(bq, bk, p.Dp, p.Dp, nk_even, ldS, false, Qh.data(),
                                      p.kt_vnni + slab + 2 * j0, S, true);
          for (int64_t r = 0; r < bq; ++r) scale_row(S + r * ldS, bk, p.scale);
        } else if (f32b) {
          // S(bq x bk) = Q(bq x D) . K^T(D x bk), then the scale
          at::native::cpublas::brgemm(bq, bk, D, p.q_sn, nk_even, ldS, false, qp, p.kt_f32 + slab + j0, S,
                                      false);
          for (int64_t r = 0; r < bq; ++r) scale_row(S + r * ldS, bk, p.scale);
        } else {
          // S^T(bk x bq, col-major) = K(bk x D) . Q^T
          sgemm(TransposeType::Transpose, TransposeType::NoTranspose, bk, bq, D, p.scale,
                kp + j0 * p.k_sn, p.k_sn, qp, p.q_sn, 0.f, S, ldS);
        }
        const bool band = !tile_inside_band(p, s, i0, bq, j0, bk);
        const float* padrow = nullptr;
        if constexpr (PAD) {
          if (sparse) fill_padadd(p, s, j0, bk, padbuf.data());
          padrow = sparse ? padbuf.data() : padbuf.data() + (j0 - lo);
        }
        score_tile<bias_t, ALIBI, PAD>(p, s, h, S, ldS, i0, bq, j0, bk, band, padrow, slope);
        if constexpr (BITS) {
          if (partial) apply_mask_bits(p, s, h, S, ldS, i0, bq, j0, bk);
        }
        for (int64_t r = 0; r < bq; ++r) {
          float* row = S + r * ldS;
          const float mx = row_max(row, bk);
          const float mnew = nan_max(m[r], mx);
          if (mnew == kNegInf) {
            std::fill(row, row + bk, 0.f);
            continue;
          }
          const float sum = exp_sub_sum(row, bk, mnew);
          if (m[r] != mnew) {
            // alpha underflows to 0 when the new maximum is far above the old one (ALiBi, large
            // biases): O must be rescaled then too. While m[r] == -inf nothing was accumulated.
            const float alpha = std::exp(m[r] - mnew);
            l[r] *= alpha;
            if (m[r] != kNegInf) scale_row(O + r * D, D, alpha);
          }
          l[r] += sum;
          m[r] = mnew;
          if constexpr (DROP) {
            apply_keep(row, bk, hash32(dbase ^ static_cast<uint32_t>(i0 + r)),
                       static_cast<uint32_t>(j0), p.thr, 1.f);
          }
        }
        if (bf) {
          // O(bq x D) += bf16(P)(bq x bk_even) . V(bk_even x D)
          const int64_t bke = round_up_even(bk);
          load_bf16_rows(S, ldS, bq, bk, bke, Ph.data());
          at::native::cpublas::brgemm(bq, D, bke, bke, D, D, true, Ph.data(), p.v_vnni + slab + j0 * D, O,
                                      true);
        } else if (f32b) {
          // O(bq x D) += P(bq x bk) . V(bk x D)
          at::native::cpublas::brgemm(bq, D, bk, ldS, p.v_sn, D, true, S, vp + j0 * p.v_sn, O, false);
        } else {
          // O^T(D x bq) += V^T(D x bk) . P^T(bk x bq)
          sgemm(TransposeType::NoTranspose, TransposeType::NoTranspose, D, bq, bk, 1.f,
                vp + j0 * p.v_sn, p.v_sn, S, ldS, 1.f, O, D);
        }
      };
      if (!sparse) {
        for (int64_t j0 = lo; j0 < hi; j0 += p.fbk) key_tile(j0, std::min(p.fbk, hi - j0), false);
      } else {
        const int64_t row = sched_row(p, s.tb, h) * p.nqb + it.qb;
        for_each_block_run(p.part_kv_idx + row * p.nkb, p.part_kv_num[row], p.full_kv_idx + row * p.nkb,
                           p.full_kv_num[row], p.blk_k, p.fbk, s.nk, [&](int64_t j0, int64_t bk, bool partial) {
                             if (j0 + bk <= lo || j0 >= hi) return;  // outside the band: never touched
                             key_tile(j0, bk, partial);
                           });
      }
      for (int64_t r = 0; r < bq; ++r) {
        float* orow = op + r * D;
        if (m[r] != kNegInf) {  // the row saw a key (NaN scores give NaN rows, like the math)
          const float inv = (DROP ? p.rp : 1.f) / l[r];
          const float* src = O + r * D;
          int64_t c = 0;
          const fVec vi(inv);
          for (; c + fVec::size() <= D; c += fVec::size()) (fVec::loadu(src + c) * vi).store(orow + c);
          for (; c < D; ++c) orow[c] = src[c] * inv;
          lp[r] = m[r] + std::log(l[r]);
        } else {
          std::fill(orow, orow + D, 0.f);
          lp[r] = kNegInf;
        }
      }
    }
    if (bf || f32b) at::native::cpublas::brgemm_release(bf);
  });
}

// ------------------------------------------------------------------------------------------
// backward
// ------------------------------------------------------------------------------------------

struct BwdBufs {
  const float* dout;
  int64_t do_sb, do_sh, do_sn;
  const float* lse;    // (B, H, NqT) contiguous
  const float* delta;  // (B, H, NqT) contiguous
  float* dq;           // (C, B, H, NqT, D) contiguous
  float* dk;           // (B, Hkv, NkT, D) contiguous
  float* dv;
  float* dbias;  // (B, H, NqT, NkT) contiguous or nullptr
  int64_t C;
};

template <typename bias_t, bool ALIBI, bool PAD, bool DROP, bool BITS = false>
void bwd_kernel(const Params& p, const std::vector<Seq>& seqs, const BwdBufs& g) {
  const int64_t D = p.D;
  const int64_t G = p.H / p.Hkv;
  const int64_t nseq = static_cast<int64_t>(seqs.size());
  const int64_t C = g.C;
  const int64_t ntasks = nseq * p.Hkv * C;
  const int64_t dq_cstride = p.B * p.H * p.NqT * D;

  std::atomic<int64_t> next{0};
  const int64_t nworkers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  at::parallel_for(0, nworkers, 1, [&](int64_t, int64_t) {
    std::vector<float> Sbuf(p.bbq * p.bbk), dPbuf(p.bbq * p.bbk), padbuf(p.bbk);
    float* S = Sbuf.data();
    float* dP = dPbuf.data();
    // bf16 tiles. dK and dV are accumulated transposed, dK^T += Q^T . dS and dV^T += dO^T . Pd, so
    // that the (bq x bk) tiles only need row conversions and row pairing, never a transpose:
    //  Qh, dOh: Q and dO rows (A of S and dP); QT, dOT: Q^T and dO^T (A of dK^T, dV^T);
    //  Pb, Pv: Pd rows and their VNNI row pairs (B of dV^T); dSs, dSv: scale * dS rows (A of dQ)
    //  and their row pairs (B of dK^T); dKt, dVt: the (D x bk) fp32 accumulators of a key block
    const bool bf = p.kt_vnni != nullptr;
    const int64_t bqe = round_up_even(p.bbq), bke = round_up_even(p.bbk);
    const size_t nq_h = bf ? p.bbq * p.Dp : 0, nqt = bf ? D * bqe : 0, ntile = bf ? bqe * bke : 0;
    std::vector<c10::BFloat16> Qh(nq_h), dOh(nq_h), QT(nqt), dOT(nqt), Pb(ntile), Pv(ntile), dSs(ntile), dSv(ntile);
    std::vector<float> dKt(bf ? D * p.bbk : 0), dVt(bf ? D * p.bbk : 0), srow(bf ? p.bbk : 0);
    for (int64_t t = next.fetch_add(1); t < ntasks; t = next.fetch_add(1)) {
      const int64_t c = t % C;
      const int64_t hk = (t / C) % p.Hkv;
      const Seq& s = seqs[t / (C * p.Hkv)];
      const int64_t nkb = (s.nk + p.bbk - 1) / p.bbk;
      const float* kbase = p.k + s.tb * p.k_sb + hk * p.k_sh + s.k0 * p.k_sn;
      const float* vbase = p.v + s.tb * p.v_sb + hk * p.v_sh + s.k0 * p.v_sn;
      float* dkbase = g.dk + ((s.tb * p.Hkv + hk) * p.NkT + s.k0) * D;
      float* dvbase = g.dv + ((s.tb * p.Hkv + hk) * p.NkT + s.k0) * D;
      const int64_t slab = bf ? p.slab_off[(t / (C * p.Hkv)) * p.Hkv + hk] : 0;
      const int64_t nk_even = round_up_even(s.nk);
      for (int64_t kb = c; kb < nkb; kb += C) {
        const int64_t j0 = kb * p.bbk;
        const int64_t bk = std::min(p.bbk, s.nk - j0);
        const int64_t ldS = bk;
        const float* kp = kbase + j0 * p.k_sn;
        const float* vp = vbase + j0 * p.v_sn;
        float* dkp = dkbase + j0 * D;
        float* dvp = dvbase + j0 * D;
        int64_t ilo = 0, ihi = s.nq;  // query range [ilo, ihi)
        if (p.wr >= 0) ilo = std::max<int64_t>(ilo, j0 - s.off - p.wr);
        if (p.wl >= 0) ihi = std::min<int64_t>(ihi, j0 + bk - 1 - s.off + p.wl + 1);
        if (ilo >= ihi) continue;
        if constexpr (PAD) fill_padadd(p, s, j0, bk, padbuf.data());
        if (bf) {
          std::fill(dKt.begin(), dKt.begin() + D * bk, 0.f);
          std::fill(dVt.begin(), dVt.begin() + D * bk, 0.f);
        }

        for (int64_t gi = 0; gi < G; ++gi) {
          const int64_t h = hk * G + gi;
          float slope = 0.f;
          if constexpr (ALIBI) slope = slope_of(p, s, h);
          uint32_t dbase = 0;
          if constexpr (DROP) dbase = drop_base(p, s, h);
          const int64_t rowbase = (s.tb * p.H + h) * p.NqT + s.q0;  // row index of local i = 0
          // one query tile [i0, i0 + bq) against key block kb; partial = the element mask bits apply
          auto query_tile = [&](int64_t i0, int64_t bq, bool partial) {
            const float* qp = p.q + s.tb * p.q_sb + h * p.q_sh + (s.q0 + i0) * p.q_sn;
            const float* dop = g.dout + s.tb * g.do_sb + h * g.do_sh + (s.q0 + i0) * g.do_sn;
            const float* lsep = g.lse + rowbase + i0;
            const float* dlp = g.delta + rowbase + i0;
            float* dqp = g.dq + c * dq_cstride + (rowbase + i0) * D;

            if (bf) {
              // S(bq x bk) = Q . K^T, dP(bq x bk) = dO . V^T
              load_bf16_rows(qp, p.q_sn, bq, D, p.Dp, Qh.data());
              load_bf16_rows(dop, g.do_sn, bq, D, p.Dp, dOh.data());
              at::native::cpublas::brgemm(bq, bk, p.Dp, p.Dp, nk_even, ldS, false, Qh.data(),
                                          p.kt_vnni + slab + 2 * j0, S, true);
              for (int64_t r = 0; r < bq; ++r) scale_row(S + r * ldS, bk, p.scale);
            } else {
              sgemm(TransposeType::Transpose, TransposeType::NoTranspose, bk, bq, D, p.scale, kp,
                    p.k_sn, qp, p.q_sn, 0.f, S, ldS);
            }
            const bool band = !tile_inside_band(p, s, i0, bq, j0, bk);
            score_tile<bias_t, ALIBI, PAD>(p, s, h, S, ldS, i0, bq, j0, bk, band,
                                           PAD ? padbuf.data() : nullptr, slope);
            if constexpr (BITS) {
              if (partial) apply_mask_bits(p, s, h, S, ldS, i0, bq, j0, bk);
            }
            if (bf) {
              at::native::cpublas::brgemm(bq, bk, p.Dp, p.Dp, nk_even, ldS, false, dOh.data(),
                                          p.vt_vnni + slab + 2 * j0, dP, true);
            } else {
              // dPd^T(bk x bq) = V(bk x D) . dO^T
              sgemm(TransposeType::Transpose, TransposeType::NoTranspose, bk, bq, D, 1.f, vp,
                    p.v_sn, dop, g.do_sn, 0.f, dP, ldS);
            }
            for (int64_t r = 0; r < bq; ++r) {
              float* prow = S + r * ldS;
              float* drow = dP + r * ldS;
              const float L = lsep[r];
              if (L == kNegInf) {
                std::fill(prow, prow + bk, 0.f);
                std::fill(drow, drow + bk, 0.f);
                continue;
              }
              const float dl = dlp[r];
              if constexpr (DROP) {
                exp_sub(prow, bk, L);  // P
                const uint32_t hrow = hash32(dbase ^ static_cast<uint32_t>(i0 + r));
                const uint32_t uj0 = static_cast<uint32_t>(j0);
                for (int64_t cc = 0; cc < bk; ++cc) {
                  const uint32_t hv = hash32(hrow ^ (uj0 + static_cast<uint32_t>(cc)));
                  const float km = ((hv >> 8) >= p.thr) ? p.rp : 0.f;
                  const float pv = prow[cc];
                  drow[cc] = pv * (drow[cc] * km - dl);  // dS
                  prow[cc] = pv * km;                    // dropped P
                }
              } else {
                // fused: P = exp(S - L); dS = P * (dP - delta)
                int64_t cc = 0;
                const fVec vdl(dl), vL(L);
                for (; cc + fVec::size() <= bk; cc += fVec::size()) {
                  const fVec pv = vexp(fVec::loadu(prow + cc) - vL);
                  pv.store(prow + cc);
                  (pv * (fVec::loadu(drow + cc) - vdl)).store(drow + cc);
                }
                if (cc < bk) {
                  const int64_t rem = bk - cc;
                  const fVec pv = vexp(fVec::loadu(prow + cc, rem) - vL);
                  pv.store(prow + cc, rem);
                  (pv * (fVec::loadu(drow + cc, rem) - vdl)).store(drow + cc, rem);
                }
              }
            }
            if (bf) {
              const int64_t bq_e = round_up_even(bq), bk_e = round_up_even(bk);
              load_bf16_transposed(qp, p.q_sn, bq, D, bq_e, QT.data());
              load_bf16_transposed(dop, g.do_sn, bq, D, bq_e, dOT.data());
              load_bf16_rows(S, ldS, bq, bk, bk, Pb.data());
              pair_rows_bf16(Pb.data(), bk, bq, bk, Pv.data());
              const fVec vs(p.scale);
              for (int64_t r = 0; r < bq; ++r) {
                at::vec::map([vs](fVec x) { return x * vs; }, srow.data(), dP + r * ldS, bk);
                load_bf16_rows(srow.data(), bk, 1, bk, bk_e, dSs.data() + r * bk_e);
              }
              pair_rows_bf16(dSs.data(), bk_e, bq, bk, dSv.data());
              // dV^T(D x bk) += dO^T . Pd; dK^T(D x bk) += Q^T . (scale dS); dQ(bq x D) += (scale dS) . K
              at::native::cpublas::brgemm(D, bk, bq_e, bq_e, bk, bk, true, dOT.data(), Pv.data(), dVt.data(), true);
              at::native::cpublas::brgemm(D, bk, bq_e, bq_e, bk, bk, true, QT.data(), dSv.data(), dKt.data(), true);
              at::native::cpublas::brgemm(bq, D, bk_e, bk_e, D, D, true, dSs.data(), p.k_vnni + slab + j0 * D,
                                          dqp, true);
            } else {
              // dV^T(D x bk) += dO^T(D x bq) . Pd(bq x bk)
              sgemm(TransposeType::NoTranspose, TransposeType::Transpose, D, bk, bq, 1.f, dop,
                    g.do_sn, S, ldS, 1.f, dvp, D);
              // dK^T(D x bk) += scale * Q^T(D x bq) . dS(bq x bk)
              sgemm(TransposeType::NoTranspose, TransposeType::Transpose, D, bk, bq, p.scale, qp,
                    p.q_sn, dP, ldS, 1.f, dkp, D);
              // dQ^T(D x bq) += scale * K^T(D x bk) . dS^T(bk x bq)
              sgemm(TransposeType::NoTranspose, TransposeType::NoTranspose, D, bq, bk, p.scale, kp,
                    p.k_sn, dP, ldS, 1.f, dqp, D);
            }
            if (g.dbias) {
              float* db = g.dbias + (rowbase + i0) * p.NkT + j0;  // varlen never has bias
              for (int64_t r = 0; r < bq; ++r)
                std::copy(dP + r * ldS, dP + r * ldS + bk, db + r * p.NkT);
            }
          };
          if (p.full_q_num == nullptr) {
            for (int64_t i0 = ilo; i0 < ihi; i0 += p.bbq) query_tile(i0, std::min(p.bbq, ihi - i0), false);
          } else {
            const int64_t row = sched_row(p, s.tb, h) * p.nkb + kb;
            for_each_block_run(p.part_q_idx + row * p.nqb, p.part_q_num[row], p.full_q_idx + row * p.nqb,
                               p.full_q_num[row], p.blk_q, p.bbq, s.nq, [&](int64_t i0, int64_t bq, bool partial) {
                                 if (i0 + bq <= ilo || i0 >= ihi) return;  // outside the band
                                 query_tile(i0, bq, partial);
                               });
          }
        }
        if (bf) {  // dK, dV (bk x D) += the transposed accumulators
          for (int64_t j = 0; j < bk; ++j)
            for (int64_t d = 0; d < D; ++d) {
              dkp[j * D + d] += dKt[d * bk + j];
              dvp[j * D + d] += dVt[d * bk + j];
            }
        }
      }
    }
    if (bf) at::native::cpublas::brgemm_release(true);
  });
}

// ------------------------------------------------------------------------------------------
// dispatch
// ------------------------------------------------------------------------------------------
template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void dispatch_flags(const c10::optional<at::Tensor>& bias, bool alibi, bool pad, bool drop, F&& f) {
  auto with_bool = [](bool b, auto&& g) {
    if (b) g(std::true_type{});
    else g(std::false_type{});
  };
  auto rest = [&](auto btag) {
    with_bool(alibi, [&](auto A) {
      with_bool(pad, [&](auto P) {
        with_bool(drop, [&](auto Dr) { f(btag, A, P, Dr); });
      });
    });
  };
  if (!bias.has_value()) {
    rest(Tag<void>{});
  } else {
    switch (bias->scalar_type()) {
      case at::kFloat: rest(Tag<float>{}); break;
      case at::kHalf: rest(Tag<c10::Half>{}); break;
      case at::kBFloat16: rest(Tag<c10::BFloat16>{}); break;
      default: TORCH_CHECK(false, "pyattn_cpu attention: unsupported bias dtype ", bias->scalar_type());
    }
  }
}

// fp32 view usable by BLAS: unit last stride, row stride >= D (or a single row)
at::Tensor as_f32(const at::Tensor& t) {
  at::Tensor r = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
  const int64_t D = r.size(-1);
  const bool ok = r.stride(-1) == 1 || r.size(-1) == 1;
  const bool ld_ok = r.size(-2) <= 1 || r.stride(-2) >= D;
  if (!ok || !ld_ok) r = r.contiguous();
  return r;
}
inline int64_t row_stride(const at::Tensor& t) {
  return t.size(-2) <= 1 ? std::max<int64_t>(t.size(-1), 1) : t.stride(-2);
}

std::vector<int64_t> cu_to_vec(const at::Tensor& cu) {
  at::Tensor c = cu.to(at::kCPU).to(at::kLong).contiguous();
  const int64_t* d = c.data_ptr<int64_t>();
  return std::vector<int64_t>(d, d + c.numel());
}

struct Setup {
  Params p;
  std::vector<Seq> seqs;
  at::Tensor q32, k32, v32, bias_t, slopes_t, kpm_t;  // keep alive
  at::Tensor kt_f32, kt_vnni, v_vnni, vt_vnni, k_vnni;
  std::vector<int64_t> slab_off;
};

// Tile products: BLAS sgemm, fp32 brgemm (forward) or bf16 brgemm (forward and backward); see the
// file comment.
// PYATTN_CPU_ATTN_BRGEMM=0 forces sgemm (the path of CPUs without AVX512), =1 uses brgemm even for
// few query rows (tests).
enum class TileKind { kSgemm, kBrgemmF32, kBrgemmBF16 };

// Query rows per kv head (GQA group x longest query sequence) below which packing K/V for brgemm
// costs more than it saves (decoding: one query per sequence).
constexpr int64_t kMinBrgemmRows = 128;

int64_t query_rows_per_kv_head(const Setup& st) {
  int64_t max_nq = 0;
  for (const auto& s : st.seqs) max_nq = std::max(max_nq, s.nq);
  return max_nq * (st.p.H / st.p.Hkv);
}

TileKind tile_kind(at::ScalarType dtype, int64_t rows_per_kv_head) {
  const char* env = std::getenv("PYATTN_CPU_ATTN_BRGEMM");  // "0": never, "1": whatever the size
  if (env != nullptr && env[0] == '0') return TileKind::kSgemm;
  if (rows_per_kv_head < kMinBrgemmRows && !(env != nullptr && env[0] == '1')) return TileKind::kSgemm;
  // ATen's brgemm runs on oneDNN, which torch.backends.mkldnn.enabled = False switches off
  if (!at::globalContext().userEnabledMkldnn()) return TileKind::kSgemm;
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
  static const bool has_bf16 = __builtin_cpu_supports("avx512bf16");
  return (dtype == at::kBFloat16 && has_bf16) ? TileKind::kBrgemmBF16 : TileKind::kBrgemmF32;
#else
  (void)dtype;
  return TileKind::kSgemm;
#endif
}

constexpr int64_t kPackBlock = 16;

// Slab offsets (element units) of the packed K/V buffers: one slab per (sequence, kv head).
void plan_slabs(Setup& st) {
  const int64_t Dp = round_up_even(st.p.D), Hkv = st.p.Hkv;
  const int64_t nslab = static_cast<int64_t>(st.seqs.size()) * Hkv;
  st.slab_off.assign(nslab + 1, 0);
  for (int64_t i = 0; i < nslab; ++i)
    st.slab_off[i + 1] = st.slab_off[i] + round_up_even(st.seqs[i / Hkv].nk) * Dp;
  st.p.slab_off = st.slab_off.data();
  st.p.Dp = Dp;
}

// Packs K^T of every (sequence, kv head) into fp32 (D, nk_even) slabs.
void pack_kt_f32(Setup& st) {
  plan_slabs(st);
  Params& p = st.p;
  const int64_t D = p.D, Hkv = p.Hkv;
  const int64_t nslab = static_cast<int64_t>(st.seqs.size()) * Hkv;
  st.kt_f32 = at::empty({st.slab_off[nslab]}, at::TensorOptions().dtype(at::kFloat));
  float* kt = st.kt_f32.data_ptr<float>();
  at::parallel_for(0, nslab, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Seq& s = st.seqs[i / Hkv];
      const int64_t nke = round_up_even(s.nk);
      const float* kp = p.k + s.tb * p.k_sb + (i % Hkv) * p.k_sh + s.k0 * p.k_sn;
      float* kd = kt + st.slab_off[i];
      // blocked transpose: both the reads and the writes of a block stay within a few cache lines
      for (int64_t j0 = 0; j0 < nke; j0 += kPackBlock)
        for (int64_t d0 = 0; d0 < D; d0 += kPackBlock)
          for (int64_t d = d0; d < std::min(D, d0 + kPackBlock); ++d)
            for (int64_t j = j0; j < std::min(nke, j0 + kPackBlock); ++j)
              kd[d * nke + j] = j < s.nk ? kp[j * p.k_sn + d] : 0.f;
    }
  });
  p.kt_f32 = kt;
}

// Packs K^T and V of every (sequence, kv head) into the VNNI slabs described in Params.
// VNNI layouts of a (rows x D) operand per slab: pairs along D give the B operand of X . M^T
// ((Dp/2, rows_even, 2)); pairs along rows give the B operand of Y . M ((rows_even/2, D, 2)).
enum class Pairs { kAlongD, kAlongRows };

// Packs the key-side tensor `base` (strides sb, sh, sn; rows of the sequence's keys) of every
// (sequence, kv head) into bf16 VNNI slabs; returns the buffer (kept alive by `keep`).
const c10::BFloat16* pack_bf16_slabs(const Setup& st, const float* base, int64_t sb, int64_t sh, int64_t sn,
                                     Pairs pairs, at::Tensor& keep) {
  const Params& p = st.p;
  const int64_t D = p.D, Dp = p.Dp, Hkv = p.Hkv;
  const int64_t nslab = static_cast<int64_t>(st.seqs.size()) * Hkv;
  keep = at::empty({st.slab_off[nslab]}, at::TensorOptions().dtype(at::kBFloat16));
  c10::BFloat16* out = keep.data_ptr<c10::BFloat16>();
  at::parallel_for(0, nslab, 1, [&](int64_t begin, int64_t end) {
    std::vector<c10::BFloat16> tmp(2 * kPackBlock * Dp);
    for (int64_t i = begin; i < end; ++i) {
      const Seq& s = st.seqs[i / Hkv];
      const int64_t nke = round_up_even(s.nk);
      const float* src = base + s.tb * sb + (i % Hkv) * sh + s.k0 * sn;
      c10::BFloat16* dst = out + st.slab_off[i];
      // blocks of rows converted with vector code into tmp (rows x Dp bf16, zero padded), then
      // placed as 32-bit words: (row, d-pair) words transposed for kAlongD, row pairs for kAlongRows
      for (int64_t j0 = 0; j0 < nke; j0 += 2 * kPackBlock) {
        const int64_t rows = std::min(2 * kPackBlock, nke - j0);
        const int64_t valid = std::max<int64_t>(0, std::min(rows, s.nk - j0));
        load_bf16_rows(src + j0 * sn, sn, valid, D, Dp, tmp.data());
        std::fill(tmp.begin() + valid * Dp, tmp.begin() + rows * Dp, c10::BFloat16(0.f));
        if (pairs == Pairs::kAlongD) {
          const auto* t32 = reinterpret_cast<const uint32_t*>(tmp.data());
          auto* d32 = reinterpret_cast<uint32_t*>(dst);
          for (int64_t d2 = 0; d2 < Dp / 2; ++d2)
            for (int64_t j = 0; j < rows; ++j) d32[d2 * nke + j0 + j] = t32[j * (Dp / 2) + d2];
        } else {
          pair_rows_bf16(tmp.data(), Dp, rows, D, dst + j0 * D);
        }
      }
    }
  });
  return out;
}

// Forward operands: K^T (pairs along D) and V (pairs along keys).
void pack_kv_bf16(Setup& st) {
  plan_slabs(st);
  Params& p = st.p;
  p.kt_vnni = pack_bf16_slabs(st, p.k, p.k_sb, p.k_sh, p.k_sn, Pairs::kAlongD, st.kt_vnni);
  p.v_vnni = pack_bf16_slabs(st, p.v, p.v_sb, p.v_sh, p.v_sn, Pairs::kAlongRows, st.v_vnni);
}

// Backward operands: K^T and V^T (pairs along D) for S and dP, K (pairs along keys) for dQ.
void pack_kv_bf16_backward(Setup& st) {
  plan_slabs(st);
  Params& p = st.p;
  p.kt_vnni = pack_bf16_slabs(st, p.k, p.k_sb, p.k_sh, p.k_sn, Pairs::kAlongD, st.kt_vnni);
  p.vt_vnni = pack_bf16_slabs(st, p.v, p.v_sb, p.v_sh, p.v_sn, Pairs::kAlongD, st.vt_vnni);
  p.k_vnni = pack_bf16_slabs(st, p.k, p.k_sb, p.k_sh, p.k_sn, Pairs::kAlongRows, st.k_vnni);
}

Setup make_setup(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& alibi,
                 const c10::optional<at::Tensor>& kpm, const c10::optional<at::Tensor>& cu_q,
                 const c10::optional<at::Tensor>& cu_k, double scale, int64_t wl, int64_t wr,
                 bool bottom_right, double dropout_p, int64_t thr, int64_t seed) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "pyattn_cpu attention: q/k/v must be 4-D");
  Setup st;
  Params& p = st.p;
  st.q32 = as_f32(q);
  st.k32 = as_f32(k);
  st.v32 = as_f32(v);
  p.B = q.size(0);
  p.H = q.size(1);
  p.NqT = q.size(2);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.NkT = k.size(2);
  TORCH_CHECK(p.Hkv > 0 && p.H % p.Hkv == 0, "pyattn_cpu attention: H % Hkv != 0");
  p.q = st.q32.data_ptr<float>();
  p.q_sb = st.q32.stride(0); p.q_sh = st.q32.stride(1); p.q_sn = row_stride(st.q32);
  p.k = st.k32.data_ptr<float>();
  p.k_sb = st.k32.stride(0); p.k_sh = st.k32.stride(1); p.k_sn = row_stride(st.k32);
  p.v = st.v32.data_ptr<float>();
  p.v_sb = st.v32.stride(0); p.v_sh = st.v32.stride(1); p.v_sn = row_stride(st.v32);
  p.scale = static_cast<float>(scale);
  p.wl = wl;
  p.wr = wr;
  if (bias.has_value()) {
    st.bias_t = *bias;
    TORCH_CHECK(st.bias_t.dim() == 4, "pyattn_cpu attention: bias must be 4-D");
    p.bias = st.bias_t.data_ptr();
    p.bias_sb = st.bias_t.stride(0); p.bias_sh = st.bias_t.stride(1);
    p.bias_sq = st.bias_t.stride(2); p.bias_sk = st.bias_t.stride(3);
  }
  if (alibi.has_value()) {
    st.slopes_t = alibi->to(at::kFloat);
    if (st.slopes_t.dim() == 1) st.slopes_t = st.slopes_t.unsqueeze(0);
    p.slopes = st.slopes_t.data_ptr<float>();
    p.sl_nb = st.slopes_t.size(0);
    p.sl_sb = st.slopes_t.stride(0);
    p.sl_sh = st.slopes_t.stride(1);
  }
  if (kpm.has_value()) {
    st.kpm_t = kpm->scalar_type() == at::kBool ? *kpm : kpm->to(at::kBool);
    p.kpm = st.kpm_t.data_ptr<bool>();
    p.kpm_sb = st.kpm_t.stride(0);
    p.kpm_sk = st.kpm_t.stride(1);
  }
  if (dropout_p > 0.0) {
    p.rp = static_cast<float>(1.0 / (1.0 - dropout_p));
    p.thr = static_cast<uint32_t>(thr);
    p.seed = static_cast<uint32_t>(seed);
  }
  if (cu_q.has_value()) {
    TORCH_CHECK(cu_k.has_value() && p.B == 1, "pyattn_cpu attention: bad varlen arguments");
    auto cq = cu_to_vec(*cu_q), ck = cu_to_vec(*cu_k);
    TORCH_CHECK(cq.size() == ck.size() && !cq.empty(), "pyattn_cpu attention: cu_seqlens size mismatch");
    for (size_t s = 0; s + 1 < cq.size(); ++s) {
      Seq sq;
      sq.tb = 0;
      sq.lb = static_cast<int64_t>(s);
      sq.q0 = cq[s];
      sq.k0 = ck[s];
      sq.nq = cq[s + 1] - cq[s];
      sq.nk = ck[s + 1] - ck[s];
      sq.off = bottom_right ? sq.nk - sq.nq : 0;
      st.seqs.push_back(sq);
    }
  } else {
    for (int64_t b = 0; b < p.B; ++b) {
      Seq sq;
      sq.tb = b;
      sq.lb = b;
      sq.q0 = 0;
      sq.k0 = 0;
      sq.nq = p.NqT;
      sq.nk = p.NkT;
      sq.off = bottom_right ? p.NkT - p.NqT : 0;
      st.seqs.push_back(sq);
    }
  }
  // tile sizes. Dense: large tiles (fewer, more efficient BLAS calls). Banded (causal/window):
  // smaller query tiles, since the diagonal tiles compute ~bq/2 masked columns per row. Shrink
  // further while there are too few tasks to keep all threads busy.
  {
    int64_t maxq = 0, maxk = 0;
    for (const auto& sq : st.seqs) {
      maxq = std::max(maxq, sq.nq);
      maxk = std::max(maxk, sq.nk);
    }
    const bool banded = wl >= 0 || wr >= 0;
    const int64_t nseq = static_cast<int64_t>(st.seqs.size());
    const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
    auto pow2_clamp = [](int64_t x, int64_t lo, int64_t hi) {
      int64_t r = lo;
      while (r * 2 <= std::min(x, hi)) r *= 2;
      return r;
    };
    p.fbk = banded ? 256 : 512;
    p.fbq = banded ? pow2_clamp(maxq / 16, 64, 256) : 256;
    while (p.fbq > 32 && nseq * p.H * ((maxq + p.fbq - 1) / p.fbq) < want) p.fbq /= 2;
    p.bbq = banded ? 64 : 128;
    p.bbk = banded ? pow2_clamp(maxk / 16, 64, 256) : 256;
    while (p.bbk > 32 && nseq * p.Hkv * ((maxk + p.bbk - 1) / p.bbk) < want) p.bbk /= 2;
  }
  if (const char* env = std::getenv("PYATTN_CPU_ATTN_BLOCKS")) {  // tuning hook: "fbq,fbk,bbq,bbk"
    long a = 0, b = 0, c = 0, d = 0;
    if (std::sscanf(env, "%ld,%ld,%ld,%ld", &a, &b, &c, &d) == 4 && a > 0 && b > 0 && c > 0 && d > 0) {
      // key block sizes stay even: the bf16 tiles address keys in VNNI pairs
      p.fbq = a; p.fbk = round_up_even(b); p.bbq = c; p.bbk = round_up_even(d);
    }
  }
  return st;
}

// The forward of a prepared Setup: packing, work items, output allocation; `kernel(p, items,
// out, lse)` runs the specialised fwd_kernel.
template <typename K>
std::tuple<at::Tensor, at::Tensor> run_forward(Setup& st, const at::Tensor& q, bool zero_first, K&& kernel) {
  const Params& p = st.p;
  at::Tensor out32 = pyattn_cpu::empty_output({p.B, p.H, p.NqT, p.D}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({p.B, p.H, p.NqT}, q.options().dtype(at::kFloat));
  if (p.NqT == 0 || p.D == 0) {
    out32.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out32.to(q.scalar_type()), lse};
  }
  switch (tile_kind(q.scalar_type(), query_rows_per_kv_head(st))) {
    case TileKind::kBrgemmBF16: pack_kv_bf16(st); break;
    case TileKind::kBrgemmF32: pack_kt_f32(st); break;
    case TileKind::kSgemm: break;
  }
  // work items: (sequence, query block), later query blocks first: under causal masking they
  // carry the most keys, and dynamic scheduling works best largest-first
  std::vector<QItem> items;
  {
    int64_t max_nqb = 0;
    for (const auto& sq : st.seqs) max_nqb = std::max(max_nqb, (sq.nq + p.fbq - 1) / p.fbq);
    for (int64_t qb = max_nqb - 1; qb >= 0; --qb)
      for (size_t si = 0; si < st.seqs.size(); ++si)
        if (qb * p.fbq < st.seqs[si].nq)
          items.push_back({static_cast<int32_t>(si), static_cast<int32_t>(qb)});
  }
  // rows not owned by any sequence (varlen with cu_q[-1] < total_q) stay defined
  if (zero_first) {
    out32.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
  }
  if (!items.empty()) kernel(p, items, out32.data_ptr<float>(), lse.data_ptr<float>());
  at::Tensor out = q.scalar_type() == at::kFloat ? out32 : out32.to(q.scalar_type());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& alibi_slopes,
    const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& cu_seqlens_q,
    const c10::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double scale, int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p,
    int64_t dropout_threshold, int64_t seed) {
  (void)max_seqlen_q;
  (void)max_seqlen_k;
  Setup st = make_setup(q, k, v, bias, alibi_slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                        scale, window_left, window_right, bottom_right, dropout_p,
                        dropout_threshold, seed);
  return run_forward(st, q, cu_seqlens_q.has_value(), [&](const Params& p, const std::vector<QItem>& items,
                                                          float* out, float* lse) {
    dispatch_flags(bias, alibi_slopes.has_value(), key_padding_mask.has_value(), dropout_p > 0.0,
                   [&](auto btag, auto A, auto P, auto Dr) {
                     using bias_t = typename decltype(btag)::type;
                     fwd_kernel<bias_t, decltype(A)::value, decltype(P)::value, decltype(Dr)::value>(
                         p, st.seqs, items, out, lse);
                   });
  });
}

// The backward of a prepared Setup: packing, delta, dq classes, buffers; `kernel(p, g)` runs the
// specialised bwd_kernel.
template <typename K>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_backward(
    Setup& st, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool bias_requires_grad, K&& kernel) {
  const Params& p = st.p;
  if (tile_kind(q.scalar_type(), query_rows_per_kv_head(st)) == TileKind::kBrgemmBF16) pack_kv_bf16_backward(st);
  const auto fopt = q.options().dtype(at::kFloat);
  at::Tensor do32 = as_f32(dout);
  at::Tensor lse32 = lse.to(at::kFloat).contiguous();
  at::Tensor delta = (do32 * out.to(at::kFloat)).sum(-1).contiguous();  // (B, H, NqT)

  const int64_t nseq = static_cast<int64_t>(st.seqs.size());
  int64_t max_nkb = 1;
  for (const auto& s : st.seqs) max_nkb = std::max(max_nkb, (s.nk + p.bbk - 1) / p.bbk);
  const int64_t nthr = at::get_num_threads();
  const int64_t base_tasks = nseq * p.Hkv;
  int64_t C = 1;
  if (base_tasks < 2 * nthr) C = std::min(max_nkb, (2 * nthr + base_tasks - 1) / base_tasks);
  C = std::max<int64_t>(C, 1);

  at::Tensor dqbuf = pyattn_cpu::zeros_output({C, p.B, p.H, p.NqT, p.D}, fopt);
  at::Tensor dk32 = pyattn_cpu::zeros_output({p.B, p.Hkv, p.NkT, p.D}, fopt);
  at::Tensor dv32 = pyattn_cpu::zeros_output({p.B, p.Hkv, p.NkT, p.D}, fopt);
  at::Tensor dbias;
  if (bias_requires_grad) dbias = pyattn_cpu::zeros_output({p.B, p.H, p.NqT, p.NkT}, fopt);
  else dbias = at::empty({0}, fopt);

  if (p.NqT > 0 && p.NkT > 0 && p.D > 0) {
    BwdBufs g;
    g.dout = do32.data_ptr<float>();
    g.do_sb = do32.stride(0);
    g.do_sh = do32.stride(1);
    g.do_sn = row_stride(do32);
    g.lse = lse32.data_ptr<float>();
    g.delta = delta.data_ptr<float>();
    g.dq = dqbuf.data_ptr<float>();
    g.dk = dk32.data_ptr<float>();
    g.dv = dv32.data_ptr<float>();
    g.dbias = bias_requires_grad ? dbias.data_ptr<float>() : nullptr;
    g.C = C;
    kernel(p, g);
  }
  at::Tensor dq32 = C == 1 ? dqbuf.select(0, 0) : dqbuf.sum(0);
  auto cast = [](const at::Tensor& t, at::ScalarType dt) { return dt == at::kFloat ? t : t.to(dt); };
  return {cast(dq32, q.scalar_type()), cast(dk32, k.scalar_type()), cast(dv32, v.scalar_type()), dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& alibi_slopes, const c10::optional<at::Tensor>& key_padding_mask,
    const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left,
    int64_t window_right, bool bottom_right, double dropout_p, int64_t dropout_threshold,
    int64_t seed, bool bias_requires_grad) {
  (void)max_seqlen_q;
  (void)max_seqlen_k;
  Setup st = make_setup(q, k, v, bias, alibi_slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                        scale, window_left, window_right, bottom_right, dropout_p,
                        dropout_threshold, seed);
  return run_backward(st, dout, q, k, v, out, lse, bias_requires_grad, [&](const Params& p, const BwdBufs& g) {
    dispatch_flags(bias, alibi_slopes.has_value(), key_padding_mask.has_value(), dropout_p > 0.0,
                   [&](auto btag, auto A, auto P, auto Dr) {
                     using bias_t = typename decltype(btag)::type;
                     bwd_kernel<bias_t, decltype(A)::value, decltype(P)::value, decltype(Dr)::value>(
                         p, st.seqs, g);
                   });
  });
}


// ------------------------------------------------------------------------------------------
// block-sparse attention: the same kernels, walking an explicit block schedule
// ------------------------------------------------------------------------------------------
struct Schedule {
  at::Tensor part_num, part_idx, full_num, full_idx, bits;  // keep alive
};

// Points the Params at a schedule's lists (forward: kv lists, backward: q lists) and the mask bits;
// tiles line up with the blocks (query tiles of blk_q rows forward, key tiles of blk_k backward).
void attach_schedule(Setup& st, Schedule& sc, const at::Tensor& part_num, const at::Tensor& part_idx,
                     const at::Tensor& full_num, const at::Tensor& full_idx, const c10::optional<at::Tensor>& bits,
                     int64_t block_q, int64_t block_k, bool forward) {
  Params& p = st.p;
  TORCH_CHECK(full_num.dim() == 3 && full_idx.dim() == 4, "pyattn_cpu block_sparse: schedule must be (Bm, Hm, nb[, nb])");
  auto i32 = [](const at::Tensor& t) { return t.to(at::kInt).contiguous(); };
  sc.part_num = i32(part_num); sc.part_idx = i32(part_idx); sc.full_num = i32(full_num); sc.full_idx = i32(full_idx);
  p.sch_B = sc.full_num.size(0);
  p.sch_H = sc.full_num.size(1);
  p.blk_q = block_q;
  p.blk_k = block_k;
  p.nqb = (p.NqT + block_q - 1) / block_q;
  p.nkb = (p.NkT + block_k - 1) / block_k;
  TORCH_CHECK(sc.full_num.size(2) == (forward ? p.nqb : p.nkb), "pyattn_cpu block_sparse: schedule size mismatch");
  const int32_t *pn = sc.part_num.data_ptr<int32_t>(), *pi = sc.part_idx.data_ptr<int32_t>();
  const int32_t *fn = sc.full_num.data_ptr<int32_t>(), *fi = sc.full_idx.data_ptr<int32_t>();
  if (forward) {
    p.part_kv_num = pn; p.part_kv_idx = pi; p.full_kv_num = fn; p.full_kv_idx = fi;
    p.fbq = block_q;
    p.fbk = std::max<int64_t>(block_k, 256 / block_k * block_k);
  } else {
    p.part_q_num = pn; p.part_q_idx = pi; p.full_q_num = fn; p.full_q_idx = fi;
    p.bbk = block_k;
    p.bbq = std::max<int64_t>(block_q, 128 / block_q * block_q);
  }
  if (bits.has_value()) {
    sc.bits = bits->contiguous();
    TORCH_CHECK(sc.bits.scalar_type() == at::kByte && sc.bits.dim() == 4, "pyattn_cpu block_sparse: bits must be uint8 4-D");
    p.bits = sc.bits.data_ptr<uint8_t>();
    p.bits_sb = sc.bits.size(0) == 1 ? 0 : sc.bits.stride(0);
    p.bits_sh = sc.bits.size(1) == 1 ? 0 : sc.bits.stride(1);
    p.bits_sq = sc.bits.stride(2);
  }
}

template <typename F>
void dispatch_sparse_flags(bool pad, bool drop, bool bits, F&& f) {
  auto with_bool = [](bool b, auto&& g) {
    if (b) g(std::true_type{});
    else g(std::false_type{});
  };
  with_bool(pad, [&](auto P) { with_bool(drop, [&](auto Dr) { with_bool(bits, [&](auto Bi) { f(P, Dr, Bi); }); }); });
}

std::tuple<at::Tensor, at::Tensor> block_sparse_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv_num_blocks,
    const at::Tensor& kv_indices, const at::Tensor& full_kv_num_blocks, const at::Tensor& full_kv_indices,
    const c10::optional<at::Tensor>& mask_bits, const c10::optional<at::Tensor>& key_padding_mask,
    int64_t block_q, int64_t block_k, double scale, int64_t window_left, int64_t window_right, bool bottom_right,
    double dropout_p, int64_t dropout_threshold, int64_t seed) {
  Setup st = make_setup(q, k, v, c10::nullopt, c10::nullopt, key_padding_mask, c10::nullopt, c10::nullopt, scale,
                        window_left, window_right, bottom_right, dropout_p, dropout_threshold, seed);
  Schedule sc;
  attach_schedule(st, sc, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, mask_bits, block_q,
                  block_k, true);
  return run_forward(st, q, false, [&](const Params& p, const std::vector<QItem>& items, float* out, float* lse) {
    dispatch_sparse_flags(key_padding_mask.has_value(), dropout_p > 0.0, mask_bits.has_value(),
                          [&](auto P, auto Dr, auto Bi) {
                            fwd_kernel<void, false, decltype(P)::value, decltype(Dr)::value, decltype(Bi)::value>(
                                p, st.seqs, items, out, lse);
                          });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& q_num_blocks, const at::Tensor& q_indices,
    const at::Tensor& full_q_num_blocks, const at::Tensor& full_q_indices, const c10::optional<at::Tensor>& mask_bits,
    const c10::optional<at::Tensor>& key_padding_mask, int64_t block_q, int64_t block_k, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p, int64_t dropout_threshold,
    int64_t seed) {
  Setup st = make_setup(q, k, v, c10::nullopt, c10::nullopt, key_padding_mask, c10::nullopt, c10::nullopt, scale,
                        window_left, window_right, bottom_right, dropout_p, dropout_threshold, seed);
  Schedule sc;
  attach_schedule(st, sc, q_num_blocks, q_indices, full_q_num_blocks, full_q_indices, mask_bits, block_q, block_k,
                  false);
  auto r = run_backward(st, dout, q, k, v, out, lse, false, [&](const Params& p, const BwdBufs& g) {
    dispatch_sparse_flags(key_padding_mask.has_value(), dropout_p > 0.0, mask_bits.has_value(),
                          [&](auto P, auto Dr, auto Bi) {
                            bwd_kernel<void, false, decltype(P)::value, decltype(Dr)::value, decltype(Bi)::value>(
                                p, st.seqs, g);
                          });
  });
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

}  // namespace pyattn_cpu_attention

TORCH_LIBRARY_FRAGMENT(pyattn_cpu, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? alibi_slopes, Tensor? "
      "key_padding_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int "
      "max_seqlen_k, float scale, int window_left, int window_right, bool bottom_right, float "
      "dropout_p, int dropout_threshold, int seed) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? "
      "bias, Tensor? alibi_slopes, Tensor? key_padding_mask, Tensor? cu_seqlens_q, Tensor? "
      "cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, int window_left, int "
      "window_right, bool bottom_right, float dropout_p, int dropout_threshold, int seed, bool "
      "bias_requires_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "block_sparse_fwd(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, Tensor kv_indices, Tensor "
      "full_kv_num_blocks, Tensor full_kv_indices, Tensor? mask_bits, Tensor? key_padding_mask, int block_q, int "
      "block_k, float scale, int window_left, int window_right, bool bottom_right, float dropout_p, int "
      "dropout_threshold, int seed) -> (Tensor, Tensor)");
  m.def(
      "block_sparse_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor q_num_blocks, "
      "Tensor q_indices, Tensor full_q_num_blocks, Tensor full_q_indices, Tensor? mask_bits, Tensor? "
      "key_padding_mask, int block_q, int block_k, float scale, int window_left, int window_right, bool "
      "bottom_right, float dropout_p, int dropout_threshold, int seed) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyattn_cpu, CPU, m) {
  m.impl("attention_fwd", &pyattn_cpu_attention::attention_fwd);
  m.impl("attention_bwd", &pyattn_cpu_attention::attention_bwd);
  m.impl("block_sparse_fwd", &pyattn_cpu_attention::block_sparse_fwd);
  m.impl("block_sparse_bwd", &pyattn_cpu_attention::block_sparse_bwd);
}
