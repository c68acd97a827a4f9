// Gated linear unit on the CPU:
//   out   = act(gate) * up                          (fp32 math, stored in gate's dtype)
//   dgate = dout * up * act'(gate),  dup = dout * act(gate)   (and optionally h = act(gate) * up)
// gate/up: (T, I) views with unit column stride and any row stride (usually the two halves of one
// (T, 2I) pre-activation). Rows are split across threads with at::parallel_for, each row is
// processed with at::vec vectors (AVX2/AVX-512 per the build tier).
// activation codes: 0 silu, 1 gelu (exact erf), 2 gelu_tanh, 3 relu, 4 sigmoid.
//
// Ops (torch.ops.pyattn_cpu.*):
//   glu_fwd(gate, up, act) -> out (T, I) contiguous
//   glu_bwd(dout, gate, up, act) -> (dgate, dup) contiguous (T, I)
//   glu_fwd_out(gate, up, act, out!)                  writes into a caller's view (any row stride)
//   glu_bwd_out(dout!, gate, up, act, dgate!, dup!, store_h)
//       writes dgate/dup into caller views (e.g. the halves of one (T, 2I) buffer) and, when
//       store_h, overwrites dout with h = act(gate) * up (the recompute for the weight gradient)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/vec_utils.h"
#include "cpu/alloc.h"

namespace pyattn_cpu {
namespace {

enum Act { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3, kSigmoid = 4 };

inline fVec vsigmoid(const fVec& g) {
  const fVec one(1.f);
  return one / (one + g.neg().exp());
}

template <int A>
inline fVec act_v(const fVec& g) {
  if constexpr (A == kSilu) {
    return g * vsigmoid(g);
  } else if constexpr (A == kGelu) {
    return fVec(0.5f) * g * (fVec(1.f) + (g * fVec(0.70710678118654752f)).erf());
  } else if constexpr (A == kGeluTanh) {
    const fVec inner = fVec(0.79788456080286536f) * (g + fVec(0.044715f) * g * g * g);
    return fVec(0.5f) * g * (fVec(1.f) + inner.tanh());
  } else if constexpr (A == kRelu) {
    return at::vec::maximum(g, fVec(0.f));
  } else {
    return vsigmoid(g);
  }
}

// act(g), with act'(g) written to d
template <int A>
inline fVec act_grad_v(const fVec& g, fVec& d) {
  const fVec one(1.f);
  if constexpr (A == kSilu) {
    const fVec s = vsigmoid(g);
    d = s * (one + g * (one - s));
    return g * s;
  } else if constexpr (A == kGelu) {
    const fVec cdf = fVec(0.5f) * (one + (g * fVec(0.70710678118654752f)).erf());
    const fVec pdf = fVec(0.39894228040143268f) * (fVec(-0.5f) * g * g).exp();
    d = cdf + g * pdf;
    return g * cdf;
  } else if constexpr (A == kGeluTanh) {
    const fVec k0(0.79788456080286536f), k1(0.044715f);
    const fVec t = (k0 * (g + k1 * g * g * g)).tanh();
    d = fVec(0.5f) * (one + t) + fVec(0.5f) * g * (one - t * t) * k0 * (one + fVec(3.f) * k1 * g * g);
    return fVec(0.5f) * g * (one + t);
  } else if constexpr (A == kRelu) {
    const fVec zero(0.f);
    d = fVec::blendv(zero, one, g > zero);
    return at::vec::maximum(g, zero);
  } else {
    const fVec s = vsigmoid(g);
    d = s * (one - s);
    return s;
  }
}

inline int64_t row_grain(int64_t I) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)); }

// fp32 row kernels on contiguous fp32 rows
template <int A>
inline void fwd_row(const float* g, const float* u, float* o, int64_t I) {
  constexpr int64_t V = fVec::size();
  int64_t i = 0;
  for (; i + V <= I; i += V) (act_v<A>(fVec::loadu(g + i)) * fVec::loadu(u + i)).store(o + i);
  if (i < I) {
    const int64_t n = I - i;
    (act_v<A>(fVec::loadu(g + i, n)) * fVec::loadu(u + i, n)).store(o + i, n);
  }
}

template <int A, bool kStoreH>
inline void bwd_row(const float* d, const float* g, const float* u, float* dg, float* du, float* h, int64_t I) {
  constexpr int64_t V = fVec::size();
  for (int64_t i = 0; i < I; i += V) {
    const int64_t n = std::min(V, I - i);
    const fVec dv = fVec::loadu(d + i, n), gv = fVec::loadu(g + i, n), uv = fVec::loadu(u + i, n);
    fVec da;
    const fVec a = act_grad_v<A>(gv, da);
    (dv * uv * da).store(dg + i, n);
    (dv * a).store(du + i, n);
    if constexpr (kStoreH) (a * uv).store(h + i, n);  // h may alias d: d was read above
  }
}

template <typename T, int A>
void glu_fwd_kernel(const T* g, int64_t sg, const T* u, int64_t su, T* o, int64_t so, int64_t rows, int64_t I) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  at::parallel_for(0, rows, row_grain(I), [&](int64_t begin, int64_t end) {
    std::vector<float> gb(kF32 ? 0 : I), ub(kF32 ? 0 : I), ob(kF32 ? 0 : I);
    for (int64_t r = begin; r < end; ++r) {
      if constexpr (kF32) {
        fwd_row<A>(g + r * sg, u + r * su, o + r * so, I);
      } else {
        to_float(g + r * sg, gb.data(), I);
        to_float(u + r * su, ub.data(), I);
        fwd_row<A>(gb.data(), ub.data(), ob.data(), I);
        from_float(ob.data(), o + r * so, I);
      }
    }
  });
}

template <typename T, int A, bool kStoreH>
void glu_bwd_kernel(T* d, int64_t sd, const T* g, int64_t sg, const T* u, int64_t su, T* dg, int64_t sdg, T* du,
                    int64_t sdu, int64_t rows, int64_t I) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  at::parallel_for(0, rows, row_grain(I), [&](int64_t begin, int64_t end) {
    std::vector<float> db(kF32 ? 0 : I), gb(kF32 ? 0 : I), ub(kF32 ? 0 : I), dgb(kF32 ? 0 : I),
        dub(kF32 ? 0 : I), hb(kF32 || !kStoreH ? 0 : I);
    for (int64_t r = begin; r < end; ++r) {
      if constexpr (kF32) {
        bwd_row<A, kStoreH>(d + r * sd, g + r * sg, u + r * su, dg + r * sdg, du + r * sdu, d + r * sd, I);
      } else {
        to_float(d + r * sd, db.data(), I);
        to_float(g + r * sg, gb.data(), I);
        to_float(u + r * su, ub.data(), I);
        bwd_row<A, kStoreH>(db.data(), gb.data(), ub.data(), dgb.data(), dub.data(), hb.data(), I);
        from_float(dgb.data(), dg + r * sdg, I);
        from_float(dub.data(), du + r * sdu, I);
        if constexpr (kStoreH) from_float(hb.data(), d + r * sd, I);
      }
    }
  });
}

template <typename F>
void dispatch_float(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "pyattn_cpu glu: unsupported dtype ", st, " (float32, float16, bfloat16)");
  }
}

template <typename F>
void dispatch_act(int64_t act, F&& f) {
  switch (act) {
    case kSilu: f(std::integral_constant<int, kSilu>{}); break;
    case kGelu: f(std::integral_constant<int, kGelu>{}); break;
    case kGeluTanh: f(std::integral_constant<int, kGeluTanh>{}); break;
    case kRelu: f(std::integral_constant<int, kRelu>{}); break;
    case kSigmoid: f(std::integral_constant<int, kSigmoid>{}); break;
    default: TORCH_CHECK(false, "pyattn_cpu glu: activation must be 0..4, got ", act);
  }
}

inline bool unit_col(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; }
inline int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

void check_2d(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.sizes() == like.sizes(), op, ": ", name, " must be 2-D with shape ", like.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), ", expected ",
              like.scalar_type());
  TORCH_CHECK(unit_col(t), op, ": ", name, " must have unit column stride");
}

void glu_fwd_out(const at::Tensor& gate, const at::Tensor& up, int64_t activation, const at::Tensor& out) {
  check_2d(gate, gate, "glu_fwd", "gate");
  check_2d(up, gate, "glu_fwd", "up");
  check_2d(out, gate, "glu_fwd", "out");
  const int64_t T = gate.size(0), I = gate.size(1);
  if (T == 0 || I == 0) return;
  dispatch_float(gate.scalar_type(), [&](auto tag) {
    using S = decltype(tag);
    dispatch_act(activation, [&](auto a) {
      glu_fwd_kernel<S, decltype(a)::value>(gate.data_ptr<S>(), row_stride(gate), up.data_ptr<S>(), row_stride(up),
                                            out.data_ptr<S>(), row_stride(out), T, I);
    });
  });
}

at::Tensor glu_fwd(const at::Tensor& gate_in, const at::Tensor& up_in, int64_t activation) {
  TORCH_CHECK(gate_in.dim() == 2, "glu_fwd: gate must be 2-D, got ", gate_in.sizes());
  auto gate = unit_col(gate_in) ? gate_in : gate_in.contiguous();
  auto up = up_in.dim() == 2 && unit_col(up_in) ? up_in : up_in.contiguous();
  auto out = empty_output(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
  glu_fwd_out(gate, up, activation, out);
  return out;
}

void glu_bwd_out(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up, int64_t activation,
                 const at::Tensor& dgate, const at::Tensor& dup, bool store_h) {
  check_2d(gate, gate, "glu_bwd", "gate");
  check_2d(up, gate, "glu_bwd", "up");
  check_2d(dout, gate, "glu_bwd", "dout");
  check_2d(dgate, gate, "glu_bwd", "dgate");
  check_2d(dup, gate, "glu_bwd", "dup");
  const int64_t T = gate.size(0), I = gate.size(1);
  if (T == 0 || I == 0) return;
  dispatch_float(gate.scalar_type(), [&](auto tag) {
    using S = decltype(tag);
    dispatch_act(activation, [&](auto a) {
      constexpr int A = decltype(a)::value;
      auto run = [&](auto kH) {
        glu_bwd_kernel<S, A, decltype(kH)::value>(dout.data_ptr<S>(), row_stride(dout), gate.data_ptr<S>(),
                                                  row_stride(gate), up.data_ptr<S>(), row_stride(up),
                                                  dgate.data_ptr<S>(), row_stride(dgate), dup.data_ptr<S>(),
                                                  row_stride(dup), T, I);
      };
      if (store_h) run(std::true_type{});
      else run(std::false_type{});
    });
  });
}

std::tuple<at::Tensor, at::Tensor> glu_bwd(const at::Tensor& dout_in, const at::Tensor& gate_in,
                                           const at::Tensor& up_in, int64_t activation) {
  TORCH_CHECK(gate_in.dim() == 2, "glu_bwd: gate must be 2-D, got ", gate_in.sizes());
  auto gate = unit_col(gate_in) ? gate_in : gate_in.contiguous();
  auto up = up_in.dim() == 2 && unit_col(up_in) ? up_in : up_in.contiguous();
  auto dout = dout_in.dim() == 2 && unit_col(dout_in) ? dout_in : dout_in.contiguous();
  auto opts = gate.options().memory_format(at::MemoryFormat::Contiguous);
  auto dgate = empty_output(gate.sizes(), opts);
  auto dup = empty_output(gate.sizes(), opts);
  // dout is only read (store_h = false)
  glu_bwd_out(dout, gate, up, activation, dgate, dup, false);
  return {dgate, dup};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyattn_cpu, m) {
  m.def("glu_fwd(Tensor gate, Tensor up, int activation) -> Tensor");
  m.def("glu_bwd(Tensor dout, Tensor gate, Tensor up, int activation) -> (Tensor, Tensor)");
  m.def("glu_fwd_out(Tensor gate, Tensor up, int activation, Tensor(a!) out) -> ()");
  m.def("glu_bwd_out(Tensor(a!) dout, Tensor gate, Tensor up, int activation, Tensor(b!) dgate, Tensor(c!) dup, "
        "bool store_h) -> ()");
}

TORCH_LIBRARY_IMPL(pyattn_cpu, CPU, m) {
  m.impl("glu_fwd", &glu_fwd);
  m.impl("glu_bwd", &glu_bwd);
  m.impl("glu_fwd_out", &glu_fwd_out);
  m.impl("glu_bwd_out", &glu_bwd_out);
}

}  // namespace pyattn_cpu
