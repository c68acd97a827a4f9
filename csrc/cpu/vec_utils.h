// Small vectorised helpers shared by the CPU kernels (fp32 math on rows of any dtype).
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>
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


constexpr float kNegInfF = -std::numeric_limits<float>::infinity();

// Counter-based hash of the dropout masks (the same function in every backend).
inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// NaN-propagating row maximum (at::vec::maximum propagates NaN too)
inline float row_max(const float* x, int64_t n) {
  int64_t c = 0;
  float m = kNegInfF;
  if (n >= fVec::size()) {
    fVec vm(kNegInfF);
    for (; c + fVec::size() <= n; c += fVec::size()) vm = at::vec::maximum(vm, fVec::loadu(x + c));
    m = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; c < n; ++c) m = nan_max(m, x[c]);
  return m;
}

// exp(t) for t <= ~88, exactly 0 for t < -87.3 (so -inf, i.e. masked scores, give 0).
// Cephes expf polynomial (~1 ulp) in at::vec ops, forced inline: GCC keeps at::vec's exp_u20 as an
// out-of-line call per vector, which cost ~10% of the forward.
__attribute__((always_inline)) inline fVec vexp(const fVec& t) {
  using iVec = at::vec::Vectorized<int32_t>;
  const fVec lo(-87.3f);
  const fVec tc = at::vec::minimum(at::vec::maximum(t, lo), fVec(88.f));
  const fVec fn = (tc * fVec(1.44269504088896341f)).round();
  fVec r = at::vec::fmadd(fn, fVec(-0.693359375f), tc);
  r = at::vec::fmadd(fn, fVec(2.12194440e-4f), r);
  fVec q(1.9875691500e-4f);
  q = at::vec::fmadd(q, r, fVec(1.3981999507e-3f));
  q = at::vec::fmadd(q, r, fVec(8.3334519073e-3f));
  q = at::vec::fmadd(q, r, fVec(4.1665795894e-2f));
  q = at::vec::fmadd(q, r, fVec(1.6666665459e-1f));
  q = at::vec::fmadd(q, r, fVec(5.0000001201e-1f));
  const fVec e = at::vec::fmadd(q, r * r, r + fVec(1.f));
  const iVec ni = (at::vec::convert_to_int_of_same_size(fn) + iVec(127)) * iVec(1 << 23);
  const fVec scale = at::vec::cast<float, int32_t>(ni);
  return fVec::blendv(e * scale, fVec(0.f), t < lo);
}

inline float row_sum(const float* x, int64_t n) {
  int64_t c = 0;
  float s = 0.f;
  if (n >= fVec::size()) {
    fVec vs(0.f);
    for (; c + fVec::size() <= n; c += fVec::size()) vs = vs + fVec::loadu(x + c);
    s = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, vs);
  }
  for (; c < n; ++c) s += x[c];
  return s;
}

// x = exp(x - m) in place
__attribute__((always_inline)) inline void exp_sub(float* x, int64_t n, float m) {
  int64_t c = 0;
  const fVec vm(m);
  for (; c + fVec::size() <= n; c += fVec::size()) vexp(fVec::loadu(x + c) - vm).store(x + c);
  if (c < n) {
    const int64_t rem = n - c;
    vexp(fVec::loadu(x + c, rem) - vm).store(x + c, rem);
  }
}

// x = exp(x - m) in place, returns the sum
inline float exp_sub_sum(float* x, int64_t n, float m) {
  exp_sub(x, n, m);
  return row_sum(x, n);
}

inline void scale_row(float* x, int64_t n, float a) {
  int64_t c = 0;
  const fVec va(a);
  for (; c + fVec::size() <= n; c += fVec::size()) (fVec::loadu(x + c) * va).store(x + c);
  for (; c < n; ++c) x[c] *= a;
}

}  // namespace pyattn_cpu
