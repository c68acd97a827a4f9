// KV-cache decoding attention on the CPU (semantics: pyattn/reference/decode.py).
//
// Work items are (sequence, kv head, split): each item walks its slice of the cache once and
// computes all R = (H / Hkv) * Nq query rows that share that kv head (GQA grouping), so every K/V
// byte is read from memory once per call. Per key block the scores (R x n) come from dots of the
// fp32 query rows with each key row (widened to fp32 in registers), then an online softmax and
// a register-blocked P @ V. With several splits, each split leaves an unnormalised fp32 partial
// (out, lse) and a second pass combines them with their log-sum-exp. Items are pulled
// dynamically by the workers (ragged lengths, cores shared with other processes); results do not
// depend on which worker ran an item.
//
// Contiguous caches (B, Hkv, max_len, D) and paged caches (num_pages, Hkv, page_size, D) with a
// block table share the kernel: a key block never crosses a page.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <limits>
#include <vector>

#include "cpu/vec_utils.h"

namespace pyattn_cpu {
namespace {

constexpr int64_t kV = fVec::size();
constexpr int64_t kBlockN = 64;  // keys per block: the block's K/V rows stay in L1/L2 for the P @ V pass
constexpr int64_t kRowGroup = 8;  // query rows per register block (8 accumulators + operands fit the registers)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 16 (AVX-512) / 8 (AVX2) elements of T at p as fp32.
template <typename T>
inline fVec load_f32(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (std::is_same_v<T, c10::BFloat16>) return fVec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
    else return fVec(_mm512_cvtph_ps(raw));
#elif defined(CPU_CAPABILITY_AVX2)
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same_v<T, c10::BFloat16>) return fVec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)));
    else return fVec(_mm256_cvtph_ps(raw));
#else
    float tmp[kV];
    for (int64_t i = 0; i < kV; ++i) tmp[i] = float(p[i]);
    return fVec::loadu(tmp);
#endif
  }
}

// Elements [0, n) of T at p as fp32, zeros after (n < kV: the tail of a head dim).
template <typename T>
inline fVec load_f32_tail(const T* p, int64_t n) {
  float tmp[kV] = {0.f};
  for (int64_t i = 0; i < n; ++i) tmp[i] = float(p[i]);
  return fVec::loadu(tmp);
}

// Software prefetch of the bytes [p, p + nbytes) into the caches (one hint per 64-byte line).
// __builtin_prefetch rather than _mm_prefetch: GCC drops the latter once inlined into the
// target("avx512bf16") functions below, which left the bf16 path without prefetches.
__attribute__((always_inline)) inline void prefetch_row(const void* p, int64_t nbytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < nbytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

inline float hsum(const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(__m512(v));
#else
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, v);
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
// out[i * stride] = sum of the lanes of v_i for four vectors: a transposing reduction tree
// (about 13 instructions instead of four separate reductions).
inline void hsum4(const fVec& a, const fVec& b, const fVec& c, const fVec& d, float* out, int64_t stride) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  const __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  const __m512 u = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));
  const __m512 w = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4E));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, w);
  out[0] = lanes[0];
  out[stride] = lanes[4];
  out[2 * stride] = lanes[8];
  out[3 * stride] = lanes[12];
}
#endif

// S[r * kBlockN] = <q_r, k> for RN query rows (fp32, zero-padded to Dp) and one key row of D elements.
template <typename T, int RN>
inline void qk_rows(const T* k, const float* q, int64_t Dp, int64_t D, float* S) {
  fVec a[RN];
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r) a[r] = fVec(0.f);
  const int64_t Dfull = D / kV * kV;
  for (int64_t d = 0; d < Dfull; d += kV) {
    const fVec kv = load_f32(k + d);
#pragma GCC unroll 8
    for (int r = 0; r < RN; ++r) a[r] = at::vec::fmadd(fVec::loadu(q + r * Dp + d), kv, a[r]);
  }
  if (Dfull < D) {
    const fVec kv = load_f32_tail(k + Dfull, D - Dfull);
#pragma GCC unroll 8
    for (int r = 0; r < RN; ++r) a[r] = at::vec::fmadd(fVec::loadu(q + r * Dp + Dfull), kv, a[r]);
  }
  int r = 0;
#if defined(CPU_CAPABILITY_AVX512)
  for (; r + 4 <= RN; r += 4) hsum4(a[r], a[r + 1], a[r + 2], a[r + 3], S + r * kBlockN, kBlockN);
#endif
  for (; r < RN; ++r) S[r * kBlockN] = hsum(a[r]);
}

// acc[r] += sum_j P[r * kBlockN + j] * v_j for RN rows and n value rows (stride vs).
template <typename T, int RN>
inline void pv_rows(const T* v, int64_t vs, int64_t n, const float* P, float* acc, int64_t Dp, int64_t D) {
  const int64_t Dfull = D / kV * kV;
  for (int64_t d = 0; d < Dp; d += kV) {
    fVec a[RN];
#pragma GCC unroll 8
    for (int r = 0; r < RN; ++r) a[r] = fVec::loadu(acc + r * Dp + d);
    if (d < Dfull) {
      for (int64_t j = 0; j < n; ++j) {
        const fVec vv = load_f32(v + j * vs + d);
#pragma GCC unroll 8
        for (int r = 0; r < RN; ++r) a[r] = at::vec::fmadd(fVec(P[r * kBlockN + j]), vv, a[r]);
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const fVec vv = load_f32_tail(v + j * vs + d, D - d);
#pragma GCC unroll 8
        for (int r = 0; r < RN; ++r) a[r] = at::vec::fmadd(fVec(P[r * kBlockN + j]), vv, a[r]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RN; ++r) a[r].store(acc + r * Dp + d);
  }
}

// f(std::integral_constant<int, rn>) for 1 <= rn <= kRowGroup.
template <typename F>
inline void with_rows(int64_t rn, F&& f) {
  switch (rn) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

#if defined(CPU_CAPABILITY_AVX512)
#define PYATTN_DPBF16 1
// bf16 caches on CPUs with AVX512-BF16: the scores come from vdpbf16ps on the bf16 query and key
// rows (exact bf16 products, fp32 sums): half the instructions of widening every key to fp32.
#define PYATTN_BF16_TARGET __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl,avx512dq")))

#define PYATTN_BF16_INLINE PYATTN_BF16_TARGET __attribute__((always_inline)) inline

// Four lane sums [sum a, sum b, sum c, sum d] (the hsum4 tree, kept in a register).
PYATTN_BF16_INLINE __m128 hsum4_128(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  const __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  const __m512 u = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));
  const __m512 w = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4E));
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), w));
}

// a[r][i] += the dots of 32 columns (from d) of query row r and key row kr[i]; a plain load
// for whole chunks (a masked load from memory is much slower on some CPUs), masked for the tail.
template <int RN, bool kMasked>
PYATTN_BF16_INLINE void dot_chunk_bf16(const c10::BFloat16* const* kr, const c10::BFloat16* q, int64_t Dh, int64_t d,
                                       __mmask32 mask, __m512 (&a)[RN][4]) {
  __m512bh kv[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    kv[i] = kMasked ? (__m512bh)_mm512_maskz_loadu_epi16(mask, kr[i] + d) : (__m512bh)_mm512_loadu_si512(kr[i] + d);
#pragma GCC unroll 4
  for (int r = 0; r < RN; ++r) {
    const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + r * Dh);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) a[r][i] = _mm512_dpbf16_ps(a[r][i], qv, kv[i]);
  }
}

// S[r * kBlockN + jj] = scale * <q_r, k_jj> for the n key rows at k (stride ks) and RN <= 4 bf16
// query rows (zero-padded to Dh, a multiple of 32). Four keys at a time: the 4 x RN accumulators
// reduce in one tree per row and the next key's dots overlap the previous reduction. On the way,
// prefetches the V rows at v (stride vs) and the next block's nn K rows at kn.
template <int RN>
PYATTN_BF16_INLINE void qk_keys_bf16(const c10::BFloat16* k, int64_t ks, int64_t n, const c10::BFloat16* q,
                                     int64_t Dh, int64_t D, float scale, float* S, const c10::BFloat16* v, int64_t vs,
                                     const c10::BFloat16* kn, int64_t nn, bool prefetch) {
  const int64_t Dfull = D / 32 * 32, row_bytes = D * 2;
  const __mmask32 tail = (__mmask32(1) << (D - Dfull)) - 1;
  const __m128 vscale = _mm_set1_ps(scale);
  for (int64_t j = 0; j < n; j += 4) {
    const c10::BFloat16* kr[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) kr[i] = k + std::min<int64_t>(j + i, n - 1) * ks;  // tail: repeat the last key
    if (prefetch) {
      for (int64_t i = j; i < std::min<int64_t>(j + 4, n); ++i) {
        prefetch_row(v + i * vs, row_bytes);
        if (i < nn) prefetch_row(kn + i * ks, row_bytes);
      }
    }
    __m512 a[RN][4];
#pragma GCC unroll 4
    for (int r = 0; r < RN; ++r)
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) a[r][i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < Dfull; d += 32) dot_chunk_bf16<RN, false>(kr, q + d, Dh, d, 0, a);
    if (Dfull < D) dot_chunk_bf16<RN, true>(kr, q + Dfull, Dh, Dfull, tail, a);
    const __mmask8 valid = __mmask8((1u << std::min<int64_t>(4, n - j)) - 1);
#pragma GCC unroll 4
    for (int r = 0; r < RN; ++r)
      _mm_mask_storeu_ps(S + r * kBlockN + j, valid, _mm_mul_ps(hsum4_128(a[r][0], a[r][1], a[r][2], a[r][3]), vscale));
  }
}

// The score pass of one key block (n rows at k, stride ks) for R query rows, in groups of four.
PYATTN_BF16_TARGET inline void qk_block_bf16(const c10::BFloat16* k, int64_t ks, int64_t n, const c10::BFloat16* q,
                                             int64_t Dh, int64_t D, int64_t R, float scale, float* S,
                                             const c10::BFloat16* v, int64_t vs, const c10::BFloat16* kn, int64_t nn) {
  for (int64_t r0 = 0; r0 < R; r0 += 4) {
    const c10::BFloat16* qr = q + r0 * Dh;
    float* Sr = S + r0 * kBlockN;
    const bool pf = r0 == 0;  // prefetch once per block
    switch (std::min<int64_t>(4, R - r0)) {
      case 1: qk_keys_bf16<1>(k, ks, n, qr, Dh, D, scale, Sr, v, vs, kn, nn, pf); break;
      case 2: qk_keys_bf16<2>(k, ks, n, qr, Dh, D, scale, Sr, v, vs, kn, nn, pf); break;
      case 3: qk_keys_bf16<3>(k, ks, n, qr, Dh, D, scale, Sr, v, vs, kn, nn, pf); break;
      default: qk_keys_bf16<4>(k, ks, n, qr, Dh, D, scale, Sr, v, vs, kn, nn, pf); break;
    }
  }
}

// acc[r] += sum_j P[r * kBlockN + j] * v_j for RN rows and n bf16 value rows (stride vs), D a
// multiple of 32. One 64-byte load gives two fp32 vectors without a widening shuffle: the even
// columns (shifted up 16 bits) and the odd ones (low half masked off), so each 32-column chunk of
// acc holds its 16 even columns, then its 16 odd ones (undone by interleave_even_odd).
template <int RN>
PYATTN_BF16_INLINE void pv_rows_bf16(const c10::BFloat16* v, int64_t vs, int64_t n, const float* P, float* acc,
                                     int64_t Dp, int64_t D) {
  const __m512i hi = _mm512_set1_epi32(int(0xFFFF0000u));
  for (int64_t d = 0; d < D; d += 32) {
    __m512 e[RN], o[RN];
#pragma GCC unroll 8
    for (int r = 0; r < RN; ++r) {
      e[r] = _mm512_loadu_ps(acc + r * Dp + d);
      o[r] = _mm512_loadu_ps(acc + r * Dp + d + 16);
    }
    for (int64_t j = 0; j < n; ++j) {
      const __m512i x = _mm512_loadu_si512(v + j * vs + d);
      const __m512 ve = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
      const __m512 vo = _mm512_castsi512_ps(_mm512_and_si512(x, hi));
#pragma GCC unroll 8
      for (int r = 0; r < RN; ++r) {
        const __m512 pr = _mm512_set1_ps(P[r * kBlockN + j]);
        e[r] = _mm512_fmadd_ps(pr, ve, e[r]);
        o[r] = _mm512_fmadd_ps(pr, vo, o[r]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RN; ++r) {
      _mm512_storeu_ps(acc + r * Dp + d, e[r]);
      _mm512_storeu_ps(acc + r * Dp + d + 16, o[r]);
    }
  }
}

PYATTN_BF16_TARGET inline void pv_block_bf16(const c10::BFloat16* v, int64_t vs, int64_t n, const float* S,
                                             float* acc, int64_t R, int64_t Dp, int64_t D) {
  for (int64_t r0 = 0; r0 < R; r0 += kRowGroup) {
    const float* P = S + r0 * kBlockN;
    float* a = acc + r0 * Dp;
    switch (std::min(kRowGroup, R - r0)) {
      case 1: pv_rows_bf16<1>(v, vs, n, P, a, Dp, D); break;
      case 2: pv_rows_bf16<2>(v, vs, n, P, a, Dp, D); break;
      case 3: pv_rows_bf16<3>(v, vs, n, P, a, Dp, D); break;
      case 4: pv_rows_bf16<4>(v, vs, n, P, a, Dp, D); break;
      case 5: pv_rows_bf16<5>(v, vs, n, P, a, Dp, D); break;
      case 6: pv_rows_bf16<6>(v, vs, n, P, a, Dp, D); break;
      case 7: pv_rows_bf16<7>(v, vs, n, P, a, Dp, D); break;
      default: pv_rows_bf16<8>(v, vs, n, P, a, Dp, D); break;
    }
  }
}

// Undo pv_rows_bf16's column order in the R rows of acc: chunk [even 16 | odd 16] -> 32 in order.
inline void interleave_even_odd(float* acc, int64_t R, int64_t Dp, int64_t D) {
  float tmp[32];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; d += 32) {
      float* c = acc + r * Dp + d;
      for (int i = 0; i < 16; ++i) {
        tmp[2 * i] = c[i];
        tmp[2 * i + 1] = c[16 + i];
      }
      std::memcpy(c, tmp, sizeof(tmp));
    }
}
#endif

struct Params {
  const void* q;
  int64_t q_sb, q_sh, q_sn;  // q (B, H, Nq, D), unit last stride
  const void* k;
  const void* v;
  int64_t k_s0, k_s1, k_s2;  // cache strides: (batch or page, kv head, position)
  int64_t v_s0, v_s1, v_s2;
  const int32_t* seqlens;      // (B,)
  const int32_t* block_table;  // (B, max_pages) or nullptr (contiguous)
  int64_t bt_s0, bt_s1;
  int64_t page_size;           // paged only
  const float* alibi;          // (B, H) contiguous or nullptr
  float scale;
  int64_t window_left, window_right;  // -1 = unbounded
  int64_t n_appended;
  int64_t B, H, Hkv, Nq, D, Dp, splits;
  void* out;     // (B, H, Nq, D) contiguous, q's dtype
  float* lse;    // (B, H, Nq)
  float* part_out;  // (B, Hkv, splits, R, D) fp32 unnormalised (splits > 1)
  float* part_ml;   // (B, Hkv, splits, R, 2): running max and sum (splits > 1)
  bool dpbf16;      // bf16 scores through vdpbf16ps (CPU has AVX512-BF16)
  int64_t Dh;       // head dim rounded up to 32 (bf16 query rows for vdpbf16ps)
};

// Key range [lo, hi) that some query row of a sequence with L keys can see.
inline void key_range(const Params& p, int64_t L, int64_t& lo, int64_t& hi) {
  lo = 0;
  hi = L;
  if (p.window_left >= 0) lo = std::max<int64_t>(0, L - p.Nq - p.window_left);
  if (p.window_right >= 0) hi = std::min<int64_t>(L, L - 1 + p.window_right + 1);
}

// One (sequence, kv head, split) item. Scratch: qf (R, Dp), acc (R, Dp), S (R, kBlockN), m, l (R).
template <typename T, bool kPaged, bool kAlibi, bool kMask>
void decode_item(const Params& p, int64_t b, int64_t hk, int64_t split, float* qf, c10::BFloat16* qh, float* acc,
                 float* S, float* m, float* l) {
  const int64_t G = p.H / p.Hkv, R = G * p.Nq, D = p.D, Dp = p.Dp;
  const int64_t L = int64_t(p.seqlens[b]) + p.n_appended;
  int64_t lo, hi;
  key_range(p, L, lo, hi);
  int64_t s0 = lo, s1 = lo;
  if (hi > lo) {
    // split the visible range into equal chunks (multiples of the block size)
    const int64_t chunk = ((hi - lo + p.splits - 1) / p.splits + kBlockN - 1) / kBlockN * kBlockN;
    s0 = std::min(hi, lo + split * chunk);
    s1 = std::min(hi, s0 + chunk);
  }
  // fp32 query rows, scaled, zero-padded to Dp: row r = g * Nq + i is head hk * G + g, query i
  const T* q = static_cast<const T*>(p.q);
  for (int64_t r = 0; r < R; ++r) {
    const T* src = q + b * p.q_sb + (hk * G + r / p.Nq) * p.q_sh + (r % p.Nq) * p.q_sn;
    float* dst = qf + r * Dp;
    for (int64_t d = 0; d < D; ++d) dst[d] = float(src[d]) * p.scale;
    for (int64_t d = D; d < Dp; ++d) dst[d] = 0.f;
    m[r] = kNegInf;
    l[r] = 0.f;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (p.dpbf16) {  // unscaled bf16 copy, zero-padded to Dh
        c10::BFloat16* dh = qh + r * p.Dh;
        for (int64_t d = 0; d < D; ++d) dh[d] = src[d];
        for (int64_t d = D; d < p.Dh; ++d) dh[d] = c10::BFloat16(0.f);
      }
    }
  }
  std::fill(acc, acc + R * Dp, 0.f);
  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);
  // block starting at key j: K/V row pointers and its length (a block never crosses a page)
  auto locate = [&](int64_t j, const T*& kp, const T*& vp) -> int64_t {
    int64_t n = std::min(kBlockN, s1 - j);
    if constexpr (kPaged) {
      const int64_t page = p.block_table[b * p.bt_s0 + (j / p.page_size) * p.bt_s1];
      const int64_t slot = j % p.page_size;
      n = std::min(n, p.page_size - slot);
      kp = kbase + page * p.k_s0 + hk * p.k_s1 + slot * p.k_s2;
      vp = vbase + page * p.v_s0 + hk * p.v_s1 + slot * p.v_s2;
    } else {
      kp = kbase + b * p.k_s0 + hk * p.k_s1 + j * p.k_s2;
      vp = vbase + b * p.v_s0 + hk * p.v_s1 + j * p.v_s2;
    }
    return n;
  };
  const int64_t row_bytes = D * int64_t(sizeof(T));
  // bf16 P @ V from whole 32-column loads (pv_rows_bf16) when the head dim allows
  const bool pv_even_odd = std::is_same_v<T, c10::BFloat16> && p.dpbf16 && D % 32 == 0;
  (void)pv_even_odd;
  const T *kp = nullptr, *vp = nullptr, *kn = nullptr, *vn = nullptr;
  int64_t n = s0 < s1 ? locate(s0, kp, vp) : 0;
  for (int64_t j0 = s0; j0 < s1; j0 += n, kp = kn, vp = vn, n = j0 < s1 ? locate(j0, kp, vp) : 0) {
    const int64_t nn = j0 + n < s1 ? locate(j0 + n, kn, vn) : 0;
    // ---- scores S[r][jj] = <qf_r, k_j>, row groups of kRowGroup sharing each widened key chunk;
    // V rows are fetched meanwhile (the P @ V pass walks them by columns)
#ifdef PYATTN_DPBF16
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (p.dpbf16) {
        qk_block_bf16(kp, p.k_s2, n, qh, p.Dh, D, R, p.scale, S, vp, p.v_s2, kn, nn);
        goto softmax;
      }
    }
#endif
    for (int64_t jj = 0; jj < n; ++jj) {
      prefetch_row(vp + jj * p.v_s2, row_bytes);
      if (jj < nn) prefetch_row(kn + jj * p.k_s2, row_bytes);  // the next block's keys, one row ahead each
      for (int64_t r0 = 0; r0 < R; r0 += kRowGroup)
        with_rows(std::min(kRowGroup, R - r0), [&](auto rn) {
          qk_rows<T, decltype(rn)::value>(kp + jj * p.k_s2, qf + r0 * Dp, Dp, D, S + r0 * kBlockN + jj);
        });
    }
  softmax:
    // ---- masks / ALiBi (query i sits at position L - Nq + i), online softmax
    for (int64_t r = 0; r < R; ++r) {
      float* s = S + r * kBlockN;
      const int64_t pos = L - p.Nq + r % p.Nq;
      if constexpr (kAlibi) {
        const float slope = p.alibi[b * p.H + hk * G + r / p.Nq];
        for (int64_t jj = 0; jj < n; ++jj) s[jj] -= slope * float(std::abs(pos - (j0 + jj)));
      }
      if constexpr (kMask) {
        for (int64_t jj = 0; jj < n; ++jj) {
          const int64_t j = j0 + jj;
          if ((p.window_left >= 0 && j < pos - p.window_left) || (p.window_right >= 0 && j > pos + p.window_right))
            s[jj] = kNegInf;
        }
      }
      const float mnew = nan_max(m[r], row_max(s, n));
      if (mnew == kNegInf) {  // nothing visible yet: P = 0
        for (int64_t jj = 0; jj < n; ++jj) s[jj] = 0.f;
        continue;
      }
      int64_t jj = 0;
      fVec vsum(0.f);
      const fVec vm(mnew);
      for (; jj + kV <= n; jj += kV) {
        const fVec e = vexp(fVec::loadu(s + jj) - vm);
        e.store(s + jj);
        vsum = vsum + e;
      }
      float sum = hsum(vsum);
      for (; jj < n; ++jj) {
        s[jj] = std::exp(s[jj] - mnew);
        sum += s[jj];
      }
      if (mnew != m[r]) {
        const float alpha = m[r] == kNegInf ? 0.f : std::exp(m[r] - mnew);
        l[r] *= alpha;
        const fVec va(alpha);
        float* ar = acc + r * Dp;
        for (int64_t d = 0; d < Dp; d += kV) (fVec::loadu(ar + d) * va).store(ar + d);
        m[r] = mnew;
      }
      l[r] += sum;
    }
    // ---- acc[r] += P[r] @ V: per head-dim chunk, the row group's accumulators stay in registers
#ifdef PYATTN_DPBF16
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (pv_even_odd) {
        pv_block_bf16(vp, p.v_s2, n, S, acc, R, Dp, D);
        continue;
      }
    }
#endif
    for (int64_t r0 = 0; r0 < R; r0 += kRowGroup)
      with_rows(std::min(kRowGroup, R - r0), [&](auto rn) {
        pv_rows<T, decltype(rn)::value>(vp, p.v_s2, n, S + r0 * kBlockN, acc + r0 * Dp, Dp, D);
      });
  }
#ifdef PYATTN_DPBF16
  if (pv_even_odd) interleave_even_odd(acc, R, Dp, D);
#endif

  if (p.splits == 1) {  // final result straight away
    T* out = static_cast<T*>(p.out);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t h = hk * G + r / p.Nq, i = r % p.Nq;
      const int64_t row = (b * p.H + h) * p.Nq + i;
      const bool seen = m[r] != kNegInf;  // rows that see no key are 0; NaN rows stay NaN
      const float inv = seen ? 1.f / l[r] : 0.f;
      float* ar = acc + r * Dp;
      for (int64_t d = 0; d < Dp; d += kV) (fVec::loadu(ar + d) * fVec(inv)).store(ar + d);
      from_float(ar, out + row * D, D);
      p.lse[row] = seen ? m[r] + std::log(l[r]) : kNegInf;
    }
  } else {
    const int64_t item = (b * p.Hkv + hk) * p.splits + split;
    float* po = p.part_out + item * R * D;
    float* pml = p.part_ml + item * R * 2;
    for (int64_t r = 0; r < R; ++r) {
      std::copy(acc + r * Dp, acc + r * Dp + D, po + r * D);
      pml[2 * r] = m[r];
      pml[2 * r + 1] = l[r];
    }
  }
}

// out row = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s over the splits of one (b, hk, r).
template <typename T>
void combine_splits(const Params& p) {
  const int64_t G = p.H / p.Hkv, R = G * p.Nq, D = p.D;
  const int64_t rows = p.B * p.Hkv * R;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t % R, bh = t / R;  // bh = b * Hkv + hk
      const int64_t b = bh / p.Hkv, hk = bh % p.Hkv;
      const float* pml = p.part_ml + bh * p.splits * R * 2;
      float M = kNegInf;
      for (int64_t s = 0; s < p.splits; ++s) M = nan_max(M, pml[(s * R + r) * 2]);
      std::fill(buf.begin(), buf.end(), 0.f);
      float denom = 0.f;
      if (M != kNegInf) {
        for (int64_t s = 0; s < p.splits; ++s) {
          const float ms = pml[(s * R + r) * 2];
          if (ms == kNegInf) continue;
          const float w = std::exp(ms - M);
          denom += w * pml[(s * R + r) * 2 + 1];
          const float* po = p.part_out + ((bh * p.splits + s) * R + r) * D;
          at::vec::map2<float>([w](fVec acc, fVec x) { return at::vec::fmadd(fVec(w), x, acc); }, buf.data(),
                               buf.data(), po, D);
        }
      }
      const float inv = M != kNegInf ? 1.f / denom : 0.f;
      at::vec::map<float>([inv](fVec x) { return x * fVec(inv); }, buf.data(), buf.data(), D);
      const int64_t h = hk * G + r / p.Nq, i = r % p.Nq;
      const int64_t row = (b * p.H + h) * p.Nq + i;
      from_float(buf.data(), static_cast<T*>(p.out) + row * D, D);
      p.lse[row] = M != kNegInf ? M + std::log(denom) : kNegInf;
    }
  });
}

template <typename T, bool kPaged, bool kAlibi, bool kMask>
void run_items(const Params& p) {
  const int64_t R = (p.H / p.Hkv) * p.Nq;
  const int64_t nitems = p.B * p.Hkv * p.splits;
  std::atomic<int64_t> next{0};
  const int64_t nworkers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nitems));
  at::parallel_for(0, nworkers, 1, [&](int64_t, int64_t) {
    std::vector<float> qf(R * p.Dp), acc(R * p.Dp), S(R * kBlockN), m(R), l(R);
    std::vector<c10::BFloat16> qh(p.dpbf16 ? R * p.Dh : 0);
    for (int64_t t = next.fetch_add(1); t < nitems; t = next.fetch_add(1)) {
      const int64_t split = t % p.splits, bh = t / p.splits;
      decode_item<T, kPaged, kAlibi, kMask>(p, bh / p.Hkv, bh % p.Hkv, split, qf.data(), qh.data(), acc.data(),
                                           S.data(), m.data(), l.data());
    }
  });
  if (p.splits > 1) combine_splits<T>(p);
}

template <typename F>
void dispatch_float(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "pyattn_cpu.decode: unsupported dtype ", st);
  }
}

template <typename F>
void dispatch_bool(bool flag, F&& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

// Arguments are validated by pyattn/ops/decode.py; these checks guard memory safety only.
std::tuple<at::Tensor, at::Tensor> decode_fwd(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                              const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
                                              const std::optional<at::Tensor>& alibi_slopes, double scale,
                                              int64_t window_left, int64_t window_right, int64_t n_appended,
                                              int64_t num_splits) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, "decode_fwd: 4-D q and caches expected");
  TORCH_CHECK(q.stride(3) == 1 || q.size(3) <= 1, "decode_fwd: q needs a unit last stride");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "decode_fwd: caches need a unit last stride");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "decode_fwd: dtype mismatch");
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.is_contiguous(), "decode_fwd: seqlens");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Hkv = k_cache.size(1);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && num_splits >= 1, "decode_fwd: heads / splits");
  auto out = at::empty({B, H, Nq, D}, q.options());
  auto lse = at::empty({B, H, Nq}, q.options().dtype(at::kFloat));
  if (B == 0 || H == 0 || Nq == 0 || D == 0) return {out.zero_(), lse.fill_(-INFINITY)};
  Params p{};
  p.q = q.data_ptr();
  p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_sn = q.stride(2);
  p.k = k_cache.data_ptr(); p.v = v_cache.data_ptr();
  p.k_s0 = k_cache.stride(0); p.k_s1 = k_cache.stride(1); p.k_s2 = k_cache.stride(2);
  p.v_s0 = v_cache.stride(0); p.v_s1 = v_cache.stride(1); p.v_s2 = v_cache.stride(2);
  p.seqlens = cache_seqlens.data_ptr<int32_t>();
  const bool paged = block_table.has_value();
  if (paged) {
    TORCH_CHECK(block_table->scalar_type() == at::kInt && block_table->dim() == 2, "decode_fwd: block_table");
    p.block_table = block_table->data_ptr<int32_t>();
    p.bt_s0 = block_table->stride(0); p.bt_s1 = block_table->stride(1);
    p.page_size = k_cache.size(2);
  }
  at::Tensor slopes;
  if (alibi_slopes.has_value()) {
    slopes = alibi_slopes->to(at::kFloat).expand({B, H}).contiguous();
    p.alibi = slopes.data_ptr<float>();
  }
  p.scale = float(scale);
  p.window_left = window_left; p.window_right = window_right;
  p.n_appended = n_appended;
  p.B = B; p.H = H; p.Hkv = Hkv; p.Nq = Nq; p.D = D; p.Dp = (D + kV - 1) / kV * kV; p.splits = num_splits;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.Dh = (D + 31) / 32 * 32;
#ifdef PYATTN_DPBF16
  // PYATTN_CPU_DECODE_DPBF16=0 keeps the widening fp32 path for bf16 caches
  static const bool cpu_has_bf16_dot = __builtin_cpu_supports("avx512bf16");
  const char* dp_env = std::getenv("PYATTN_CPU_DECODE_DPBF16");
  const bool has_bf16_dot = cpu_has_bf16_dot && !(dp_env != nullptr && std::string(dp_env) == "0");
  p.dpbf16 = q.scalar_type() == at::kBFloat16 && has_bf16_dot;
#endif
  const int64_t R = (H / Hkv) * Nq;
  at::Tensor part_out, part_ml;
  if (num_splits > 1) {
    part_out = at::empty({B * Hkv * num_splits * R * D}, q.options().dtype(at::kFloat));
    part_ml = at::empty({B * Hkv * num_splits * R * 2}, q.options().dtype(at::kFloat));
    p.part_out = part_out.data_ptr<float>();
    p.part_ml = part_ml.data_ptr<float>();
  }
  // the element mask is needed only for a window or for causal rows above the last one
  const bool mask = window_left >= 0 || (window_right >= 0 && Nq > 1);
  dispatch_float(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_bool(paged, [&](auto kPaged) {
      dispatch_bool(p.alibi != nullptr, [&](auto kAlibi) {
        dispatch_bool(mask, [&](auto kMask) {
          run_items<T, decltype(kPaged)::value, decltype(kAlibi)::value, decltype(kMask)::value>(p);
        });
      });
    });
  });
  return {out, lse};
}

// k_cache[.., pos] = k_new for pos = cache_seqlens[b] + t (contiguous or through the block table).
void decode_append(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k_new, const at::Tensor& v_new,
                   const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table) {
  TORCH_CHECK(k_new.dim() == 4 && v_new.sizes() == k_new.sizes(), "decode_append: k_new / v_new shapes");
  TORCH_CHECK(k_new.scalar_type() == k_cache.scalar_type() && v_new.scalar_type() == v_cache.scalar_type(),
              "decode_append: dtype mismatch");
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.is_contiguous(), "decode_append: seqlens");
  const int64_t B = k_new.size(0), Hkv = k_new.size(1), N = k_new.size(2), D = k_new.size(3);
  const int32_t* lens = cache_seqlens.data_ptr<int32_t>();
  const bool paged = block_table.has_value();
  const int64_t P = k_cache.size(2);
  const int32_t* bt = paged ? block_table->data_ptr<int32_t>() : nullptr;
  const int64_t bt0 = paged ? block_table->stride(0) : 0, bt1 = paged ? block_table->stride(1) : 0;
  const int64_t esz = k_cache.element_size();
  auto copy_rows = [&](at::Tensor& cache, const at::Tensor& src) {
    char* dst = static_cast<char*>(cache.data_ptr());
    const char* s = static_cast<const char*>(src.data_ptr());
    at::parallel_for(0, B * Hkv * N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t i = t % N, h = (t / N) % Hkv, b = t / (N * Hkv);
        const int64_t pos = int64_t(lens[b]) + i;
        int64_t row;
        if (paged) row = int64_t(bt[b * bt0 + (pos / P) * bt1]) * cache.stride(0) + h * cache.stride(1) + (pos % P) * cache.stride(2);
        else row = b * cache.stride(0) + h * cache.stride(1) + pos * cache.stride(2);
        const int64_t srow = b * src.stride(0) + h * src.stride(1) + i * src.stride(2);
        if (src.stride(3) == 1) {
          std::memcpy(dst + row * esz, s + srow * esz, D * esz);
        } else {
          for (int64_t d = 0; d < D; ++d)
            std::memcpy(dst + (row + d) * esz, s + (srow + d * src.stride(3)) * esz, esz);
        }
      }
    });
  };
  copy_rows(k_cache, k_new);
  copy_rows(v_cache, v_new);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyattn_cpu, m) {
  m.def("decode_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? block_table, "
        "Tensor? alibi_slopes, float scale, int window_left, int window_right, int n_appended, int num_splits) "
        "-> (Tensor, Tensor)");
  m.def("decode_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, Tensor cache_seqlens, "
        "Tensor? block_table) -> ()");
}

TORCH_LIBRARY_IMPL(pyattn_cpu, CPU, m) {
  m.impl("decode_fwd", &decode_fwd);
  m.impl("decode_append", &decode_append);
}

}  // namespace pyattn_cpu
