// Small vectorised helpers shared by the CPU kernels (fp32 math on rows of any dtype).
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace pyattn_cpu {

using fVec = at::vec::Vectorized<float>;

// max that propagates NaN (std::max drops a NaN second argument): a NaN score makes its
// softmax row NaN, as in the materialised formula
inline float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

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

// Outputs at least this large are written with streaming stores: they cannot stay in cache
// anyway, and bypassing it saves the read-for-ownership of every written line.
constexpr int64_t kStreamingStoreBytes = int64_t(8) << 20;

// True when rows of n floats starting at p can be written with stream_store.
inline bool can_stream(const float* p, int64_t n) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(fVec) == 0 && n % fVec::size() == 0;
}

// Store of a full vector to a vector-aligned address, bypassing the cache where the ISA allows.
inline void stream_store(float* dst, const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_ps(dst, __m512(v));
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_stream_ps(dst, __m256(v));
#else
  v.store(dst);
#endif
}

// Orders this thread's streaming stores before anything it does next (end of a parallel chunk).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

}  // namespace pyattn_cpu
