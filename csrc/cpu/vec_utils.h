// Small vectorised helpers shared by the CPU kernels (fp32 math on rows of any dtype).
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace pyattn_cpu {

using fVec = at::vec::Vectorized<float>;

// dst[0:n] = float(src[0:n])
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// dst[0:n] = T(src[0:n]) with round-to-nearest-even
template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  fVec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  for (; i + 2 * fVec::size() <= n; i += 2 * fVec::size()) {
    acc0 = at::vec::fmadd(fVec::loadu(a + i), fVec::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(fVec::loadu(a + i + fVec::size()), fVec::loadu(b + i + fVec::size()), acc1);
  }
  for (; i + fVec::size() <= n; i += fVec::size()) {
    acc0 = at::vec::fmadd(fVec::loadu(a + i), fVec::loadu(b + i), acc0);
  }
  float s = at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace pyattn_cpu
