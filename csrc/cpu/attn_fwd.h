// CPU attention forward: tasks (head, sequence, query block) pulled dynamically by the
// at::parallel_for workers; online softmax over the visited key tiles; saves out + lse.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/vec_utils.h"
#include <ATen/Parallel.h>
#include <atomic>
#include "cpu/blas.h"
#include "cpu/attn_pack.h"

namespace pyattn_cpu_attention {

using namespace pyattn_cpu;

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
}  // namespace pyattn_cpu_attention
