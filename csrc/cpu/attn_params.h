// CPU attention: the problem description (sequences, parameters, block schedule) and THE
// score-tile routine shared by the forward and the backward (bias, ALiBi, padding, band, mask bits).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/vec_utils.h"

namespace pyattn_cpu_attention {

using namespace pyattn_cpu;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// row[c] = keep(i, j0 + c) ? row[c] * mult : 0
inline void apply_keep(float* row, int64_t n, uint32_t hrow, uint32_t j0, uint32_t thr, float mult) {
  for (int64_t c = 0; c < n; ++c) {
    const uint32_t r = hash32(hrow ^ (j0 + static_cast<uint32_t>(c)));
    row[c] = ((r >> 8) >= thr) ? row[c] * mult : 0.f;
  }
}

inline int64_t round_up_even(int64_t n) { return (n + 1) & ~int64_t(1); }

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
  // fp32 brgemm backward (kt_f32, vt_f32 != nullptr): also V^T as (D, nk_even) slabs, and Q^T, dO^T
  // as (B, H, D, NqT) (the A operands of dK^T and dV^T)
  const float* vt_f32 = nullptr;
  const float* qt_f32 = nullptr;
  const float* dot_f32 = nullptr;
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

struct Setup {
  Params p;
  std::vector<Seq> seqs;
  at::Tensor q32, k32, v32, bias_t, slopes_t, kpm_t;  // keep alive
  at::Tensor kt_f32, kt_vnni, v_vnni, vt_vnni, k_vnni, vt_f32, qt_f32, dot_f32;
  std::vector<int64_t> slab_off;
};

}  // namespace pyattn_cpu_attention
