// CPU attention backward: tasks (sequence, kv head, key-block class) own the dK/dV rows of
// their key blocks and accumulate dQ into a private buffer per class (reduced in a fixed order:
// deterministic, no atomics). P is recomputed from the saved lse.
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
    // fp32 brgemm tiles: the same transposed dK / dV accumulation, A operands Q^T and dO^T packed
    // per call, B operands K^T and V^T slabs, and the products take scale * dS (brgemm has no alpha)
    const bool f32b = p.vt_f32 != nullptr;
    const int64_t bqe = round_up_even(p.bbq), bke = round_up_even(p.bbk);
    const size_t nq_h = bf ? p.bbq * p.Dp : 0, nqt = bf ? D * bqe : 0, ntile = bf ? bqe * bke : 0;
    std::vector<c10::BFloat16> Qh(nq_h), dOh(nq_h), QT(nqt), dOT(nqt), Pb(ntile), Pv(ntile), dSs(ntile), dSv(ntile);
    std::vector<float> dKt(bf || f32b ? D * p.bbk : 0), dVt(bf || f32b ? D * p.bbk : 0), srow(bf ? p.bbk : 0);
    for (int64_t t = next.fetch_add(1); t < ntasks; t = next.fetch_add(1)) {
      const int64_t c = t % C;
      const int64_t hk = (t / C) % p.Hkv;
      const Seq& s = seqs[t / (C * p.Hkv)];
      const int64_t nkb = (s.nk + p.bbk - 1) / p.bbk;
      const float* kbase = p.k + s.tb * p.k_sb + hk * p.k_sh + s.k0 * p.k_sn;
      const float* vbase = p.v + s.tb * p.v_sb + hk * p.v_sh + s.k0 * p.v_sn;
      float* dkbase = g.dk + ((s.tb * p.Hkv + hk) * p.NkT + s.k0) * D;
      float* dvbase = g.dv + ((s.tb * p.Hkv + hk) * p.NkT + s.k0) * D;
      const int64_t slab = bf || f32b ? p.slab_off[(t / (C * p.Hkv)) * p.Hkv + hk] : 0;
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
        if (bf || f32b) {
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
            } else if (f32b) {
              // S(bq x bk) = Q(bq x D) . K^T(D x bk), then the scale
              at::native::cpublas::brgemm(bq, bk, D, p.q_sn, nk_even, ldS, false, qp, p.kt_f32 + slab + j0, S,
                                          false);
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
            } else if (f32b) {
              // dP(bq x bk) = dO(bq x D) . V^T(D x bk)
              at::native::cpublas::brgemm(bq, bk, D, g.do_sn, nk_even, ldS, false, dop, p.vt_f32 + slab + j0, dP,
                                          false);
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
            if (g.dbias) {  // dS, before the fp32 brgemm tiles scale it in place
              float* db = g.dbias + (rowbase + i0) * p.NkT + j0;  // varlen never has bias
              for (int64_t r = 0; r < bq; ++r)
                std::copy(dP + r * ldS, dP + r * ldS + bk, db + r * p.NkT);
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
            } else if (f32b) {
              const int64_t toff = (s.tb * p.H + h) * D * p.NqT + s.q0 + i0;  // Q^T, dO^T tiles, ld NqT
              for (int64_t r = 0; r < bq; ++r) scale_row(dP + r * ldS, bk, p.scale);
              // dV^T(D x bk) += dO^T . Pd; dK^T(D x bk) += Q^T . (scale dS); dQ(bq x D) += (scale dS) . K
              at::native::cpublas::brgemm(D, bk, bq, p.NqT, ldS, bk, true, p.dot_f32 + toff, S, dVt.data(), false);
              at::native::cpublas::brgemm(D, bk, bq, p.NqT, ldS, bk, true, p.qt_f32 + toff, dP, dKt.data(), false);
              at::native::cpublas::brgemm(bq, D, bk, ldS, p.k_sn, D, true, dP, kp, dqp, false);
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
        if (bf || f32b) {  // dK, dV (bk x D) += the transposed accumulators
          for (int64_t j = 0; j < bk; ++j)
            for (int64_t d = 0; d < D; ++d) {
              dkp[j * D + d] += dKt[d * bk + j];
              dvp[j * D + d] += dVt[d * bk + j];
            }
        }
      }
    }
    if (bf || f32b) at::native::cpublas::brgemm_release(bf);
  });
}
}  // namespace pyattn_cpu_attention
