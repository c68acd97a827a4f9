// CPU attention: operand packing for oneDNN brgemm — fp32 K^T slabs and bf16 VNNI pairs
// (rows of bf16 values interleaved two by two, the layout of vdpbf16ps / AMX B operands).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/vec_utils.h"
#include <ATen/Parallel.h>
#include "cpu/attn_params.h"

namespace pyattn_cpu_attention {

using namespace pyattn_cpu;

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

// Packs the transpose of the key-side tensor `base` (strides sb, sh, sn) of every (sequence, kv head)
// into fp32 (D, nk_even) slabs; returns the buffer (kept alive by `keep`).
const float* pack_t_f32(const Setup& st, const float* base, int64_t sb, int64_t sh, int64_t sn, at::Tensor& keep) {
  const Params& p = st.p;
  const int64_t D = p.D, Hkv = p.Hkv;
  const int64_t nslab = static_cast<int64_t>(st.seqs.size()) * Hkv;
  keep = at::empty({st.slab_off[nslab]}, at::TensorOptions().dtype(at::kFloat));
  float* kt = keep.data_ptr<float>();
  at::parallel_for(0, nslab, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Seq& s = st.seqs[i / Hkv];
      const int64_t nke = round_up_even(s.nk);
      const float* kp = base + s.tb * sb + (i % Hkv) * sh + s.k0 * sn;
      float* kd = kt + st.slab_off[i];
      // blocked transpose: both the reads and the writes of a block stay within a few cache lines
      for (int64_t j0 = 0; j0 < nke; j0 += kPackBlock)
        for (int64_t d0 = 0; d0 < D; d0 += kPackBlock)
          for (int64_t d = d0; d < std::min(D, d0 + kPackBlock); ++d)
            for (int64_t j = j0; j < std::min(nke, j0 + kPackBlock); ++j)
              kd[d * nke + j] = j < s.nk ? kp[j * sn + d] : 0.f;
    }
  });
  return kt;
}

// Packs K^T of every (sequence, kv head) into fp32 (D, nk_even) slabs.
void pack_kt_f32(Setup& st) {
  plan_slabs(st);
  st.p.kt_f32 = pack_t_f32(st, st.p.k, st.p.k_sb, st.p.k_sh, st.p.k_sn, st.kt_f32);
}

// dst (B, H, D, NqT) = the (B, H, NqT, D) tensor at src (strides sb, sh, sn; unit stride along D)
// transposed per head; returns the buffer (kept alive by `keep`).
const float* transpose_heads_f32(const Params& p, const float* src, int64_t sb, int64_t sh, int64_t sn,
                                 at::Tensor& keep) {
  const int64_t D = p.D, N = p.NqT;
  keep = at::empty({p.B * p.H * D * N}, at::TensorOptions().dtype(at::kFloat));
  float* out = keep.data_ptr<float>();
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const float* sp = src + (bh / p.H) * sb + (bh % p.H) * sh;
      float* dp = out + bh * D * N;
      for (int64_t i0 = 0; i0 < N; i0 += kPackBlock)
        for (int64_t d0 = 0; d0 < D; d0 += kPackBlock)
          for (int64_t d = d0; d < std::min(D, d0 + kPackBlock); ++d)
            for (int64_t i = i0; i < std::min(N, i0 + kPackBlock); ++i) dp[d * N + i] = sp[i * sn + d];
    }
  });
  return out;
}

// fp32 brgemm backward operands: K^T and V^T slabs (B of S and dP), Q^T and dO^T (A of dK^T, dV^T).
void pack_f32_backward(Setup& st, const float* dout, int64_t do_sb, int64_t do_sh, int64_t do_sn) {
  plan_slabs(st);
  Params& p = st.p;
  p.kt_f32 = pack_t_f32(st, p.k, p.k_sb, p.k_sh, p.k_sn, st.kt_f32);
  p.vt_f32 = pack_t_f32(st, p.v, p.v_sb, p.v_sh, p.v_sn, st.vt_f32);
  p.qt_f32 = transpose_heads_f32(p, p.q, p.q_sb, p.q_sh, p.q_sn, st.qt_f32);
  p.dot_f32 = transpose_heads_f32(p, dout, do_sb, do_sh, do_sn, st.dot_f32);
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
}  // namespace pyattn_cpu_attention
