// pyattn CPU LSH attention (Reformer): chunked attention over the bucket-sorted sequence.
//
// Semantics: pyattn/reference/lsh.py (lsh_chunks_reference / lsh_chunks_backward_reference).
// Hashing and the per-round sort run in torch; this file does the fused rest:
//   gather the sorted rows -> banded chunk attention (chunk c against chunks c-before .. c+after,
//   cyclic over all R*N/L chunks) with masks from the rows' original positions -> write each
//   round's output and log-sum-exp at the original positions (the unsort).
//
// Design
//  * A chunk is one task: its L query rows and W = (1+before+after)*L key rows are gathered into
//    fp32 scratch (converting fp16/bf16 once per row), scores / probabilities live in an L x W
//    scratch tile of the task, never in a tensor. Tile products go through the BLAS sgemm that
//    libtorch_cpu links (MKL / OpenBLAS; cpu/blas.h); masks and the softmax are vectorised with at::vec.
//  * Scores of masked keys are Hugging Face's finite constants (mask / self-mask values), so no row
//    is empty; their gradient is zero.
//  * Forward: tasks (batch*head, chunk), each writes rows it alone owns (the unsort is a permutation).
//  * Backward recomputes P from the saved lse. Tasks (batch*head, round group); a task walks its
//    rounds' chunks in order and scatter-adds dq/dk/dv into an fp32 accumulator of its own group
//    (rows of several rounds, and of a neighbouring round through the wrap-around, map to the same
//    position), reduced over groups at the end in a fixed order: deterministic, no atomics.
//  * In block-schedule terms: query block c visits key blocks (c + i) mod C, i in [-before, after],
//    all partial (explicit positions); the loop body is the engine's tile step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/alloc.h"
#include "cpu/blas.h"
#include "cpu/vec_utils.h"

namespace pyattn_cpu_lsh {

using pyattn_cpu::fVec;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// C (m x n, col-major, ldc) = op(A) op(B) through the shared BLAS shim (cpu/blas.h).
inline void sgemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                  int64_t ldb, float* c, int64_t ldc) {
  pyattn_cpu::sgemm(ta, tb, m, n, k, 1.f, a, lda, b, ldb, 0.f, c, ldc);
}

using pyattn_cpu::hash32;
using pyattn_cpu::row_sum;

// dst[0:n] += src[0:n]
inline void add_row(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + fVec::size() <= n; i += fVec::size()) (fVec::loadu(dst + i) + fVec::loadu(src + i)).store(dst + i);
  for (; i < n; ++i) dst[i] += src[i];
}

// x[0:n] = exp(x - m) * scale
inline void exp_scale(float* x, int64_t n, float m, float scale) {
  const fVec vm(m), vs(scale);
  int64_t c = 0;
  for (; c + fVec::size() <= n; c += fVec::size()) ((fVec::loadu(x + c) - vm).exp() * vs).store(x + c);
  for (; c < n; ++c) x[c] = std::exp(x[c] - m) * scale;
}

struct Params {
  int64_t B, H, N, D, R, T, L, C, nb, na, W;
  bool causal;
  float mask_value, self_mask_value;
  float dropout_p;
  int64_t threshold, seed;
  const int64_t* perm;  // (B, H, T)
  const bool* kpm;      // (B, N) or null
  int64_t kpm_sb, kpm_sn;
};

template <typename T>
struct Rows {  // a (B, H, N, D) operand with unit last stride
  const T* ptr;
  int64_t sb, sh, sn;
  const T* row(int64_t b, int64_t h, int64_t n) const { return ptr + b * sb + h * sh + n * sn; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// Per-task scratch: gathered operands, window positions and the score tile.
struct Window {
  std::vector<float> Q, K, V, S;
  std::vector<int64_t> pq, pk, kglob;
  std::vector<uint8_t> kpad;
  explicit Window(const Params& p)
      : Q(p.L * p.D), K(p.W * p.D), V(p.W * p.D), S(p.L * p.W), pq(p.L), pk(p.W), kglob(p.W), kpad(p.W) {}
};

template <typename T>
void gather_window(const Params& p, int64_t b, int64_t h, int64_t c, const Rows<T>& q, const Rows<T>& k,
                   const Rows<T>& v, Window& w) {
  const int64_t* pm = p.perm + (b * p.H + h) * p.T;
  const int64_t L = p.L, D = p.D;
  for (int64_t i = 0; i < L; ++i) {
    w.pq[i] = pm[c * L + i];
    pyattn_cpu::to_float(q.row(b, h, w.pq[i]), w.Q.data() + i * D, D);
  }
  const int64_t slots = p.W / L;
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t cc = (((c + s - p.nb) % p.C) + p.C) % p.C;
    for (int64_t j = 0; j < L; ++j) {
      const int64_t jj = s * L + j, pos = pm[cc * L + j];
      w.pk[jj] = pos;
      w.kglob[jj] = cc * L + j;
      w.kpad[jj] = p.kpm != nullptr && p.kpm[b * p.kpm_sb + pos * p.kpm_sn];
      pyattn_cpu::to_float(k.row(b, h, pos), w.K.data() + jj * D, D);
      pyattn_cpu::to_float(v.row(b, h, pos), w.V.data() + jj * D, D);
    }
  }
}

// S = Q K^T with the masks applied; row i of S is W floats. Returns nothing; `constant` (if given)
// marks entries replaced by a mask value.
inline void masked_scores(const Params& p, Window& w, uint8_t* constant) {
  const int64_t L = p.L, W = p.W, D = p.D;
  sgemm(true, false, W, L, D, w.K.data(), D, w.Q.data(), D, w.S.data(), W);
  for (int64_t i = 0; i < L; ++i) {
    float* srow = w.S.data() + i * W;
    const int64_t pi = w.pq[i];
    for (int64_t j = 0; j < W; ++j) {
      const int64_t pj = w.pk[j];
      uint8_t cst = 0;
      if ((p.causal && pj > pi) || w.kpad[j]) {
        srow[j] = p.mask_value;
        cst = 1;
      }
      if (pj == pi) {
        srow[j] = p.self_mask_value;
        cst = 1;
      }
      if (constant) constant[i * W + j] = cst;
    }
  }
}

inline float keep_scale(const Params& p, uint32_t a, int64_t row, int64_t col) {
  const uint32_t r = hash32(hash32(a ^ uint32_t(row)) ^ uint32_t(col));
  return int64_t(r >> 8) >= p.threshold ? 1.f / (1.f - p.dropout_p) : 0.f;
}

inline uint32_t dropout_base(const Params& p, int64_t bh) {
  return hash32(uint32_t(uint64_t(p.seed) + uint64_t(bh) * 0x9E3779B9ull));
}

// Round outputs o_r (B, H, R, N, D) of type TO and lse_r (B, H, R, N), at the original positions.
template <typename T, typename TO, bool DROP>
void fwd_kernel(const Params& p, const Rows<T>& q, const Rows<T>& k, const Rows<T>& v, TO* out, float* lse) {
  const int64_t L = p.L, W = p.W, D = p.D;
  at::parallel_for(0, p.B * p.H * p.C, 1, [&](int64_t begin, int64_t end) {
    Window w(p);
    std::vector<float> O(L * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / p.C, c = task % p.C, b = bh / p.H, h = bh % p.H;
      gather_window(p, b, h, c, q, k, v, w);
      masked_scores(p, w, nullptr);
      const uint32_t a = DROP ? dropout_base(p, bh) : 0;
      for (int64_t i = 0; i < L; ++i) {
        float* srow = w.S.data() + i * W;
        float m = kNegInf;
        for (int64_t j = 0; j < W; ++j) m = std::max(m, srow[j]);
        exp_scale(srow, W, m, 1.f);
        const float sum = row_sum(srow, W);
        const fVec inv(1.f / sum);
        int64_t j = 0;
        for (; j + fVec::size() <= W; j += fVec::size()) (fVec::loadu(srow + j) * inv).store(srow + j);
        for (; j < W; ++j) srow[j] *= 1.f / sum;
        if constexpr (DROP) {
          for (int64_t j = 0; j < W; ++j) srow[j] *= keep_scale(p, a, c * L + i, w.kglob[j]);
        }
        const int64_t r = (c * L + i) / p.N;
        lse[(bh * p.R + r) * p.N + w.pq[i]] = m + std::log(sum);
      }
      sgemm(false, false, D, L, W, w.V.data(), D, w.S.data(), W, O.data(), D);
      for (int64_t i = 0; i < L; ++i) {
        const int64_t r = (c * L + i) / p.N;
        pyattn_cpu::from_float(O.data() + i * D, out + ((bh * p.R + r) * p.N + w.pq[i]) * D, D);
      }
    }
  });
}

// The rounds were combined as out = sum_r w_r o_r, w_r = exp(lse_r - lse), so with g = dL/dout and
// dl = dL/dlse:  dS = w_r P (keep * g V^T - g.out + dl),  dV = (w_r P keep)^T g  -- o_r is not needed.
template <typename T, bool DROP>
void bwd_kernel(const Params& p, const Rows<T>& q, const Rows<T>& k, const Rows<T>& v, const T* dout, const T* out,
                const float* lse, const float* dlse, const float* lse_r, int64_t G, float* accq, float* acck,
                float* accv) {
  const int64_t L = p.L, W = p.W, D = p.D, N = p.N, chunks_per_round = p.N / p.L;
  at::parallel_for(0, p.B * p.H * G, 1, [&](int64_t begin, int64_t end) {
    Window w(p);
    std::vector<float> dO(L * D), Orow(D), dP(L * W), dQ(L * D), dK(W * D), dV(W * D);
    std::vector<uint8_t> cst(L * W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / G, g = task % G, b = bh / p.H, h = bh % p.H;
      const int64_t acc_off = (g * p.B * p.H + bh) * N * D;
      float* aq = accq + acc_off;
      float* ak = acck + acc_off;
      float* av = accv + acc_off;
      const uint32_t a = DROP ? dropout_base(p, bh) : 0;
      for (int64_t r = g; r < p.R; r += G) {
        for (int64_t c = r * chunks_per_round; c < (r + 1) * chunks_per_round; ++c) {
          gather_window(p, b, h, c, q, k, v, w);
          masked_scores(p, w, cst.data());
          // dO = w_r g, then dP = dO V^T
          float delta[1024], dl[1024];
          for (int64_t i = 0; i < L; ++i) {
            const int64_t row = bh * N + w.pq[i];
            const float wr = p.R == 1 ? 1.f : std::exp(lse_r[(bh * p.R + r) * N + w.pq[i]] - lse[row]);
            float* dOi = dO.data() + i * D;
            pyattn_cpu::to_float(dout + row * D, dOi, D);
            pyattn_cpu::to_float(out + row * D, Orow.data(), D);
            delta[i] = wr * pyattn_cpu::dot(dOi, Orow.data(), D);
            dl[i] = wr * dlse[row];
            for (int64_t d = 0; d < D; ++d) dOi[d] *= wr;
          }
          sgemm(true, false, W, L, D, w.V.data(), D, dO.data(), D, dP.data(), W);
          for (int64_t i = 0; i < L; ++i) {
            const float li = lse_r[(bh * p.R + r) * N + w.pq[i]], dli = dl[i];
            float* srow = w.S.data() + i * W;  // becomes P * keep (for dV)
            float* dprow = dP.data() + i * W;  // becomes dS
            const uint8_t* crow = cst.data() + i * W;
            exp_scale(srow, W, li, 1.f);
            for (int64_t j = 0; j < W; ++j) {
              const float z = DROP ? keep_scale(p, a, c * L + i, w.kglob[j]) : 1.f;
              const float pij = srow[j];
              dprow[j] = crow[j] ? 0.f : pij * (z * dprow[j] - delta[i] + dli);
              if constexpr (DROP) srow[j] = pij * z;
            }
          }
          sgemm(false, false, D, L, W, w.K.data(), D, dP.data(), W, dQ.data(), D);   // dQ = dS K
          sgemm(false, true, D, W, L, w.Q.data(), D, dP.data(), W, dK.data(), D);    // dK = dS^T Q
          sgemm(false, true, D, W, L, dO.data(), D, w.S.data(), W, dV.data(), D);    // dV = P^T dO
          for (int64_t i = 0; i < L; ++i) add_row(aq + w.pq[i] * D, dQ.data() + i * D, D);
          for (int64_t j = 0; j < W; ++j) {
            add_row(ak + w.pk[j] * D, dK.data() + j * D, D);
            add_row(av + w.pk[j] * D, dV.data() + j * D, D);
          }
        }
      }
    }
  });
}

Params make_params(const at::Tensor& q, const at::Tensor& perm, const std::optional<at::Tensor>& kpm, int64_t L,
                   int64_t nb, int64_t na, bool causal, double mv, double smv, double dropout_p, int64_t threshold,
                   int64_t seed) {
  TORCH_CHECK(q.dim() == 4 && q.stride(3) == 1, "pyattn_cpu.lsh: q must be (B, H, N, D) with unit last stride");
  TORCH_CHECK(perm.scalar_type() == at::kLong && perm.is_contiguous(), "pyattn_cpu.lsh: perm must be contiguous int64");
  Params p{};
  p.B = q.size(0);
  p.H = q.size(1);
  p.N = q.size(2);
  p.D = q.size(3);
  p.T = perm.size(2);
  TORCH_CHECK(p.N > 0 && p.T % p.N == 0 && L > 0 && p.T % L == 0 && p.N % L == 0,
              "pyattn_cpu.lsh: perm length must be R * N with N a multiple of chunk_length");
  p.R = p.T / p.N;
  p.L = L;
  p.C = p.T / L;
  p.nb = nb;
  p.na = na;
  p.W = (1 + nb + na) * L;
  p.causal = causal;
  p.mask_value = float(mv);
  p.self_mask_value = float(smv);
  p.dropout_p = float(dropout_p);
  p.threshold = threshold;
  p.seed = seed;
  p.perm = perm.data_ptr<int64_t>();
  if (kpm.has_value()) {
    TORCH_CHECK(kpm->scalar_type() == at::kBool, "pyattn_cpu.lsh: key_padding_mask must be bool");
    p.kpm = kpm->data_ptr<bool>();
    p.kpm_sb = kpm->stride(0);
    p.kpm_sn = kpm->stride(1);
  }
  return p;
}

template <typename F>
void dispatch_dtype(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "pyattn_cpu.lsh: unsupported dtype ", st);
  }
}

// out = sum_r w_r o_r, lse = logsumexp_r lse_r, w_r = exp(lse_r - lse) (transformers' formula).
template <typename T>
void combine_rounds(const Params& p, const float* o_r, const float* lse_r, T* out, float* lse) {
  const int64_t R = p.R, N = p.N, D = p.D;
  at::parallel_for(0, p.B * p.H * N, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D), wr(R);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / N, n = row % N;
      float m = kNegInf;
      for (int64_t r = 0; r < R; ++r) m = std::max(m, lse_r[(bh * R + r) * N + n]);
      float s = 0.f;
      for (int64_t r = 0; r < R; ++r) s += std::exp(lse_r[(bh * R + r) * N + n] - m);
      const float l = m + std::log(s);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t r = 0; r < R; ++r) {
        const fVec w(std::exp(lse_r[(bh * R + r) * N + n] - l));
        const float* src = o_r + ((bh * R + r) * N + n) * D;
        int64_t d = 0;
        for (; d + fVec::size() <= D; d += fVec::size())
          at::vec::fmadd(fVec::loadu(src + d), w, fVec::loadu(acc.data() + d)).store(acc.data() + d);
        const float ws = std::exp(lse_r[(bh * R + r) * N + n] - l);
        for (; d < D; ++d) acc[d] += ws * src[d];
      }
      pyattn_cpu::from_float(acc.data(), out + row * D, D);
      lse[row] = l;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lsh_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& perm,
    const std::optional<at::Tensor>& kpm, int64_t L, int64_t nb, int64_t na, bool causal, double mv, double smv,
    double dropout_p, int64_t threshold, int64_t seed) {
  const Params p = make_params(q, perm, kpm, L, nb, na, causal, mv, smv, dropout_p, threshold, seed);
  at::Tensor out = pyattn_cpu::empty_output({p.B, p.H, p.N, p.D}, q.options());
  at::Tensor lse_r = at::empty({p.B, p.H, p.R, p.N}, q.options().dtype(at::kFloat));
  at::Tensor lse = p.R == 1 ? lse_r.view({p.B, p.H, p.N}) : at::empty({p.B, p.H, p.N}, lse_r.options());
  at::Tensor o_r = p.R == 1 ? at::Tensor() : pyattn_cpu::empty_output({p.B, p.H, p.R, p.N, p.D}, lse_r.options());
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto drop) {
      constexpr bool DROP = decltype(drop)::value;
      if (p.R == 1) {
        fwd_kernel<T, T, DROP>(p, rows_of<T>(q), rows_of<T>(k), rows_of<T>(v), out.data_ptr<T>(),
                               lse_r.data_ptr<float>());
      } else {
        fwd_kernel<T, float, DROP>(p, rows_of<T>(q), rows_of<T>(k), rows_of<T>(v), o_r.data_ptr<float>(),
                                   lse_r.data_ptr<float>());
        combine_rounds<T>(p, o_r.data_ptr<float>(), lse_r.data_ptr<float>(), out.data_ptr<T>(),
                          lse.data_ptr<float>());
      }
    };
    if (dropout_p > 0) run(std::true_type{});
    else run(std::false_type{});
  });
  return {out, p.R == 1 ? lse.clone() : lse, lse_r};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lsh_attention_bwd(
    const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& lse_r, const at::Tensor& perm,
    const std::optional<at::Tensor>& kpm, int64_t L, int64_t nb, int64_t na, bool causal, double mv, double smv,
    double dropout_p, int64_t threshold, int64_t seed) {
  const Params p = make_params(q, perm, kpm, L, nb, na, causal, mv, smv, dropout_p, threshold, seed);
  TORCH_CHECK(p.L <= 1024, "pyattn_cpu.lsh_attention_bwd: chunk_length must be <= 1024");
  TORCH_CHECK(dout.is_contiguous() && out.is_contiguous() && lse.is_contiguous() && dlse.is_contiguous() &&
                  lse_r.is_contiguous(),
              "pyattn_cpu.lsh_attention_bwd: dout, out, lse, dlse, lse_r must be contiguous");
  // Enough round groups to keep every thread busy; each group owns an accumulator.
  const int64_t threads = at::get_num_threads();
  const int64_t G = std::min<int64_t>(p.R, std::max<int64_t>(1, (4 * threads + p.B * p.H - 1) / (p.B * p.H)));
  auto fopt = q.options().dtype(at::kFloat);
  at::Tensor aq = pyattn_cpu::zeros_output({G, p.B, p.H, p.N, p.D}, fopt);
  at::Tensor ak = pyattn_cpu::zeros_output({G, p.B, p.H, p.N, p.D}, fopt);
  at::Tensor av = pyattn_cpu::zeros_output({G, p.B, p.H, p.N, p.D}, fopt);
  at::Tensor lse32 = lse.to(at::kFloat).contiguous(), dlse32 = dlse.to(at::kFloat).contiguous();
  at::Tensor lser32 = lse_r.to(at::kFloat).contiguous();
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto drop) {
      bwd_kernel<T, decltype(drop)::value>(p, rows_of<T>(q), rows_of<T>(k), rows_of<T>(v), dout.data_ptr<T>(),
                                           out.data_ptr<T>(), lse32.data_ptr<float>(), dlse32.data_ptr<float>(),
                                           lser32.data_ptr<float>(), G,
                                           aq.data_ptr<float>(), ak.data_ptr<float>(), av.data_ptr<float>());
    };
    if (dropout_p > 0) run(std::true_type{});
    else run(std::false_type{});
  });
  auto finish = [&](const at::Tensor& acc) {
    at::Tensor s = G == 1 ? acc.select(0, 0) : acc.sum(0);
    return q.scalar_type() == at::kFloat ? s : s.to(q.scalar_type());
  };
  return {finish(aq), finish(ak), finish(av)};
}

}  // namespace pyattn_cpu_lsh

TORCH_LIBRARY_FRAGMENT(pyattn_cpu, m) {
  m.def(
      "lsh_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor perm, Tensor? key_padding_mask, int chunk_length, "
      "int chunks_before, int chunks_after, bool causal, float mask_value, float self_mask_value, float dropout_p, "
      "int dropout_threshold, int seed) -> (Tensor, Tensor, Tensor)");
  m.def(
      "lsh_attention_bwd(Tensor dout, Tensor dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor lse_r, "
      "Tensor perm, "
      "Tensor? key_padding_mask, int chunk_length, int chunks_before, int chunks_after, bool causal, "
      "float mask_value, float self_mask_value, float dropout_p, int dropout_threshold, int seed) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyattn_cpu, CPU, m) {
  m.impl("lsh_attention_fwd", &pyattn_cpu_lsh::lsh_attention_fwd);
  m.impl("lsh_attention_bwd", &pyattn_cpu_lsh::lsh_attention_bwd);
}
