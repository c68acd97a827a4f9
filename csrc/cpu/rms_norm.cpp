// RMSNorm on the CPU: y = h * rsqrt(mean(h^2) + eps) * w, h = x (+ residual), statistics in fp32.
// Rows are split across threads with at::parallel_for; each row is processed with AVX2/AVX-512
// vectors (at::vec). The weight gradient is reduced through per-chunk partial sums whose
// partition depends only on the shape, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/vec_utils.h"
#include "cpu/alloc.h"

namespace pyattn_cpu {
namespace {

// Rows handled per weight-gradient partial sum: a function of M only (deterministic).
inline int64_t rows_per_chunk(int64_t M) { return std::max<int64_t>(8, (M + 63) / 64); }
// fp32 outputs of M x N that are written with streaming stores (large, vector-aligned rows).
inline bool should_stream(const float* out, int64_t M, int64_t N) {
  return M * N * int64_t(sizeof(float)) >= kStreamingStoreBytes && can_stream(out, N);
}
inline int64_t row_grain(int64_t N) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1)); }

template <typename T, bool kResidual, bool kWeight, bool kStream>
void rms_norm_fwd_kernel(const T* x, int64_t sx, const T* res, int64_t sr, const float* w, T* y, T* h,
                         float* rstd, int64_t M, int64_t N, float eps) {
  at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(N);
    std::vector<float> rbuf(kResidual ? N : 0);
    for (int64_t row = begin; row < end; ++row) {
      const float* hf;
      if constexpr (std::is_same_v<T, float> && !kResidual) {
        hf = x + row * sx;
      } else {
        to_float(x + row * sx, buf.data(), N);
        if constexpr (kResidual) {
          to_float(res + row * sr, rbuf.data(), N);
          at::vec::map2<float>([](fVec a, fVec b) { return a + b; }, buf.data(), buf.data(), rbuf.data(), N);
          // h is rounded to the input dtype; the norm is taken of that rounded value.
          from_float(buf.data(), h + row * N, N);
          if constexpr (!std::is_same_v<T, float>) to_float(h + row * N, buf.data(), N);
        }
        hf = buf.data();
      }
      const float r = 1.f / std::sqrt(dot(hf, hf, N) / float(N) + eps);
      rstd[row] = r;
      const fVec vr(r);
      float* out = std::is_same_v<T, float> ? reinterpret_cast<float*>(y + row * N) : buf.data();
      if constexpr (kStream) {
        for (int64_t i = 0; i < N; i += fVec::size()) {
          fVec v = fVec::loadu(hf + i) * vr;
          if constexpr (kWeight) v = v * fVec::loadu(w + i);
          stream_store(out + i, v);
        }
      } else if constexpr (kWeight) {
        at::vec::map2<float>([vr](fVec a, fVec b) { return a * vr * b; }, out, hf, w, N);
      } else {
        at::vec::map<float>([vr](fVec a) { return a * vr; }, out, hf, N);
      }
      if constexpr (!std::is_same_v<T, float>) from_float(buf.data(), y + row * N, N);
    }
    if constexpr (kStream) stream_fence();
  });
}

template <typename T, bool kWeight, bool kDh, bool kStream>
void rms_norm_bwd_kernel(const T* dy, int64_t sdy, const T* x, int64_t sx, const float* w, const float* rstd,
                         const T* dh, int64_t sdh, T* dx, float* dw_part, int64_t M, int64_t N) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  constexpr int64_t V = fVec::size();
  const int64_t chunk = rows_per_chunk(M);
  const int64_t num_chunks = (M + chunk - 1) / chunk;
  at::parallel_for(0, num_chunks, 1, [&](int64_t cbegin, int64_t cend) {
    // fp32 rows are read in place; 16-bit rows are widened once into these buffers
    std::vector<float> xb(kF32 ? 0 : N), gb(kF32 ? 0 : N), hb(kF32 ? 0 : N), ob(kF32 ? 0 : N);
    for (int64_t c = cbegin; c < cend; ++c) {
      float* dwp = kWeight ? dw_part + c * N : nullptr;
      if constexpr (kWeight) std::fill(dwp, dwp + N, 0.f);
      for (int64_t row = c * chunk; row < std::min(M, (c + 1) * chunk); ++row) {
        const float r = rstd[row];
        const fVec vr(r);
        const float* xr;
        const float* gr;
        const float* hr = nullptr;
        float* out;
        if constexpr (kF32) {
          xr = x + row * sx;
          gr = dy + row * sdy;
          if constexpr (kDh) hr = dh + row * sdh;
          out = dx + row * N;
        } else {
          to_float(x + row * sx, xb.data(), N);
          to_float(dy + row * sdy, gb.data(), N);
          if constexpr (kDh) to_float(dh + row * sdh, hb.data(), N);
          xr = xb.data();
          gr = gb.data();
          hr = hb.data();
          out = ob.data();
        }
        // pass 1: s = sum(x * w * dy); dw += dy * x * rstd
        fVec acc(0.f);
        for (int64_t i = 0; i < N; i += V) {
          const int64_t n = std::min(V, N - i);
          const fVec xv = fVec::loadu(xr + i, n), gv = fVec::loadu(gr + i, n);
          if constexpr (kWeight) {
            acc = at::vec::fmadd(xv, gv * fVec::loadu(w + i, n), acc);
            at::vec::fmadd(gv * xv, vr, fVec::loadu(dwp + i, n)).store(dwp + i, n);
          } else {
            acc = at::vec::fmadd(xv, gv, acc);
          }
        }
        const float s = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, acc);
        // pass 2: dx = rstd * (w * dy - x * rstd^2 * s / N) (+ dh)
        const fVec vk(r * r * s / float(N));
        for (int64_t i = 0; i < N; i += V) {
          const int64_t n = std::min(V, N - i);
          fVec gw = fVec::loadu(gr + i, n);
          if constexpr (kWeight) gw = gw * fVec::loadu(w + i, n);
          fVec d = (gw - fVec::loadu(xr + i, n) * vk) * vr;
          if constexpr (kDh) d = d + fVec::loadu(hr + i, n);
          if constexpr (kStream) stream_store(out + i, d);
          else d.store(out + i, n);
        }
        if constexpr (!kF32) from_float(ob.data(), dx + row * N, N);
      }
    }
    if constexpr (kStream) stream_fence();
  });
}

template <typename F>
void dispatch_float(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "pyattn_cpu: unsupported dtype ", st);
  }
}

template <bool... Bs, typename F>
void dispatch_bools(F&& f) { f(std::integral_constant<bool, Bs>{}...); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                            const std::optional<at::Tensor>& residual, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm_fwd: x must be 2-D with unit column stride");
  const int64_t M = x.size(0), N = x.size(1);
  auto y = empty_output({M, N}, x.options());
  auto rstd = at::empty({M}, x.options().dtype(at::kFloat));
  const bool has_res = residual.has_value();
  auto h = has_res ? empty_output({M, N}, x.options()) : at::empty({0}, x.options());
  if (M == 0 || N == 0) return {y, h, rstd.fill_(1.f / std::sqrt(float(eps)))};
  at::Tensor w;
  if (weight.has_value()) w = weight->to(at::kFloat).contiguous();
  if (has_res) TORCH_CHECK(residual->sizes() == x.sizes() && residual->stride(1) == 1, "rms_norm_fwd: residual layout");
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* rp = has_res ? residual->data_ptr<T>() : nullptr;
    const int64_t sr = has_res ? residual->stride(0) : 0;
    const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
    auto run = [&](auto kRes, auto kW) {
      auto launch = [&](auto kStream) {
        rms_norm_fwd_kernel<T, decltype(kRes)::value, decltype(kW)::value, decltype(kStream)::value>(
            xp, x.stride(0), rp, sr, wp, y.data_ptr<T>(), has_res ? h.data_ptr<T>() : nullptr,
            rstd.data_ptr<float>(), M, N, float(eps));
      };
      if constexpr (std::is_same_v<T, float>) {
        if (should_stream(y.data_ptr<float>(), M, N)) return launch(std::true_type{});
      }
      launch(std::false_type{});
    };
    if (has_res && wp) run(std::true_type{}, std::true_type{});
    else if (has_res) run(std::true_type{}, std::false_type{});
    else if (wp) run(std::false_type{}, std::true_type{});
    else run(std::false_type{}, std::false_type{});
  });
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& xin,
                                                const std::optional<at::Tensor>& weight, const at::Tensor& rstd,
                                                const std::optional<at::Tensor>& dh) {
  TORCH_CHECK(xin.dim() == 2 && xin.stride(1) == 1 && dy.sizes() == xin.sizes() && dy.stride(1) == 1,
              "rms_norm_bwd: dy/x layout");
  const int64_t M = xin.size(0), N = xin.size(1);
  auto dx = empty_output({M, N}, xin.options());
  const bool has_w = weight.has_value();
  const bool has_dh = dh.has_value();
  if (has_dh) TORCH_CHECK(dh->sizes() == xin.sizes() && dh->stride(1) == 1, "rms_norm_bwd: dh layout");
  at::Tensor w;
  if (has_w) w = weight->to(at::kFloat).contiguous();
  const int64_t chunk = rows_per_chunk(std::max<int64_t>(M, 1));
  const int64_t num_chunks = (M + chunk - 1) / chunk;
  auto dw_part = at::empty({has_w ? num_chunks : 0, N}, xin.options().dtype(at::kFloat));
  auto rs = rstd.contiguous();
  if (M > 0 && N > 0) {
    dispatch_float(xin.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      auto run = [&](auto kW, auto kDh) {
        auto launch = [&](auto kStream) {
          rms_norm_bwd_kernel<T, decltype(kW)::value, decltype(kDh)::value, decltype(kStream)::value>(
              dy.data_ptr<T>(), dy.stride(0), xin.data_ptr<T>(), xin.stride(0), has_w ? w.data_ptr<float>() : nullptr,
              rs.data_ptr<float>(), has_dh ? dh->data_ptr<T>() : nullptr, has_dh ? dh->stride(0) : 0,
              dx.data_ptr<T>(), has_w ? dw_part.data_ptr<float>() : nullptr, M, N);
        };
        if constexpr (std::is_same_v<T, float>) {
          if (should_stream(dx.data_ptr<float>(), M, N)) return launch(std::true_type{});
        }
        launch(std::false_type{});
      };
      if (has_w && has_dh) run(std::true_type{}, std::true_type{});
      else if (has_w) run(std::true_type{}, std::false_type{});
      else if (has_dh) run(std::false_type{}, std::true_type{});
      else run(std::false_type{}, std::false_type{});
    });
  }
  at::Tensor dw = has_w ? dw_part.sum(0) : at::empty({0}, xin.options().dtype(at::kFloat));
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyattn_cpu, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, Tensor? residual, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor xin, Tensor? weight, Tensor rstd, Tensor? dh) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyattn_cpu, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
}

}  // namespace pyattn_cpu
