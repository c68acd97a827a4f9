// pyattn CPU attention engine: FlashAttention-2 style forward and backward.
//
// Semantics: pyattn/reference/attention.py (scores, band/causal/window, alibi, bias,
// key padding, varlen, dropout hash, lse convention, backward formulas).
//
// Design
//  * All arithmetic is fp32. fp32 inputs are used in place through their strides (only the last
//    dim must be unit-stride); fp16/bf16 inputs are converted to fp32 once on entry (O(N*D)), which
//    on CPUs without AVX512-BF16/AMX is also the fastest way to feed the tile products.
//  * Tile products: BLAS sgemm (cpu/blas.h), ATen's oneDNN brgemm fp32 with K^T (backward: also
//    V^T, Q^T, dO^T) packed once per call, or bf16 brgemm on CPUs with AVX512-BF16 (K^T and V
//    packed into VNNI pairs, probabilities rounded to bf16 for P.V as in GPU FlashAttention;
//    accumulation fp32). Which one, per pass, and the block sizes, is the tile policy's choice
//    (cpu/attn_tiles.h).
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
//
// Files: attn_params.h (problem, schedule, score tile), attn_pack.h (brgemm / VNNI packing),
// attn_tiles.h (tile policy), attn_fwd.h, attn_bwd.h (kernels), blas.h and vec_utils.h (shared
// with the other families); this file: argument set-up, dispatch and op registration.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

#include "cpu/alloc.h"
#include "cpu/attn_bwd.h"
#include "cpu/attn_fwd.h"
#include "cpu/attn_pack.h"
#include "cpu/attn_params.h"
#include "cpu/attn_tiles.h"
#include "cpu/blas.h"

namespace pyattn_cpu_attention {

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
    const TilePolicy& tp = tile_policy(q.scalar_type(), p.D);  // measured dense block sizes
    if (!banded && tp.fbq > 0) p.fbq = tp.fbq;
    if (!banded && tp.fbk > 0) p.fbk = round_up_even(tp.fbk);
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
  switch (tile_kind(q.scalar_type(), query_rows_per_kv_head(st), st.p.D)) {
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
    if (p.full_kv_num != nullptr) {
      // a block schedule: query blocks by listed key blocks (summed over the schedule's heads),
      // most first, so that a global row does not end the pass on one thread
      auto work = [&](const QItem& it) {
        int64_t w = 0;
        for (int64_t h = 0; h < p.sch_H; ++h) {
          const int64_t row = sched_row(p, st.seqs[it.seq].tb, h) * p.nqb + it.qb;
          w += p.part_kv_num[row] + p.full_kv_num[row];
        }
        return w;
      };
      std::stable_sort(items.begin(), items.end(), [&](const QItem& a, const QItem& b) { return work(a) > work(b); });
    }
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
  const TileKind kind = tile_kind(q.scalar_type(), query_rows_per_kv_head(st), st.p.D, /*backward=*/true);
  if (kind == TileKind::kBrgemmBF16) pack_kv_bf16_backward(st);
  const auto fopt = q.options().dtype(at::kFloat);
  at::Tensor do32 = as_f32(dout);
  if (kind == TileKind::kBrgemmF32 && p.NqT > 0 && p.NkT > 0 && p.D > 0)
    pack_f32_backward(st, do32.data_ptr<float>(), do32.stride(0), do32.stride(1), row_stride(do32));
  at::Tensor lse32 = lse.to(at::kFloat).contiguous();
  at::Tensor delta = (do32 * out.to(at::kFloat)).sum(-1).contiguous();  // (B, H, NqT)

  const int64_t nseq = static_cast<int64_t>(st.seqs.size());
  int64_t max_nkb = 1;
  for (const auto& s : st.seqs) max_nkb = std::max(max_nkb, (s.nk + p.bbk - 1) / p.bbk);
  const int64_t nthr = at::get_num_threads();
  const int64_t base_tasks = nseq * p.Hkv;
  int64_t C = 1;
  // a block schedule's key blocks carry very uneven work (a global column is visited by every
  // query block): more, smaller tasks keep the threads balanced
  const int64_t want = (p.full_q_num != nullptr ? 8 : 2) * nthr;
  if (base_tasks < want) C = std::min(max_nkb, (want + base_tasks - 1) / base_tasks);
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

namespace pyattn_cpu_attention {
// Tile policy of one (dtype, head-dim class): paths -1 = default, blocks 0 = default.
void attention_set_tile_policy(at::ScalarType dtype, int64_t head_dim, int64_t path, int64_t fbq, int64_t fbk,
                               int64_t bwd_path) {
  for (const int64_t pth : {path, bwd_path}) {
    TORCH_CHECK(pth >= -1 && pth <= 2, "pyattn_cpu attention: tile path must be -1..2, got ", pth);
    TORCH_CHECK(pth < 0 || (available_tile_paths() >> pth & 1), "pyattn_cpu attention: tile path ", pth,
                " is not available on this CPU / build");
  }
  TilePolicy& tp = tile_policy(dtype, head_dim);
  tp.path = path;
  tp.bpath = bwd_path;
  tp.fbq = std::max<int64_t>(fbq, 0);
  tp.fbk = std::max<int64_t>(fbk, 0);
}
}  // namespace pyattn_cpu_attention

TORCH_LIBRARY_FRAGMENT(pyattn_cpu, m) {
  m.def("attention_set_tile_policy(ScalarType dtype, int head_dim, int path, int block_q, int block_k, "
        "int bwd_path=-1) -> ()",
        [](at::ScalarType dt, int64_t D, int64_t path, int64_t bq, int64_t bk, int64_t bpath) {
          pyattn_cpu_attention::attention_set_tile_policy(dt, D, path, bq, bk, bpath);
        });
  m.def("attention_tile_paths() -> int", []() { return pyattn_cpu_attention::available_tile_paths(); });
  m.def("cpu_blas_vendor() -> str", []() { return pyattn_cpu::blas_vendor(); });
}

TORCH_LIBRARY_IMPL(pyattn_cpu, CPU, m) {
  m.impl("attention_fwd", &pyattn_cpu_attention::attention_fwd);
  m.impl("attention_bwd", &pyattn_cpu_attention::attention_bwd);
  m.impl("block_sparse_fwd", &pyattn_cpu_attention::block_sparse_fwd);
  m.impl("block_sparse_bwd", &pyattn_cpu_attention::block_sparse_bwd);
}
