// Shared pieces of the CUDA attention kernels: launch constants, dtype conversions, the parameter
// block, per-(sequence, head) context, score/bias/ALiBi, the dropout hash and the key/query bands.
// Semantics: pyattn/reference/attention.py.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>
#include <stdint.h>

#include <type_traits>

namespace pyattn_attn {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
// Tile configurations are chosen so that every kernel fits the 99 KB opt-in limit of sm_86/sm_89 where
// possible (sm_80/sm_90 allow 163/227 KB); the launcher checks the device limit at run time.
constexpr size_t kSmemBudget = 99 * 1024;
constexpr size_t kSmemHardLimit = 163 * 1024;

#define PYATTN_HD __host__ __device__ __forceinline__

PYATTN_HD float neg_inf() { return -__builtin_huge_valf(); }
PYATTN_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
PYATTN_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Row padding of shared tiles: 16 bytes (keeps wmma's ldm / 32-byte alignment rules and breaks bank conflicts).
template <typename T> constexpr int pad_of() { return 16 / (int)sizeof(T); }
constexpr size_t align128(size_t x) { return (x + 127) / 128 * 128; }

// --------------------------------------------------------------------------------------------- params
struct Params {
  const void* q; const void* k; const void* v; const void* dout; const void* out;
  int64_t q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, do_sb, do_sh, do_sn, o_sb, o_sh, o_sn;
  const void* bias; int bias_dtype; int64_t bias_sb, bias_sh, bias_si, bias_sj;
  const float* alibi; int64_t alibi_sb, alibi_sh;
  const uint8_t* kpm; int64_t kpm_sb, kpm_sj;
  const int32_t* cu_q; const int32_t* cu_k;
  int64_t B, H, Hkv, Nq, Nk;  // Nq/Nk: tensor lengths (total rows in varlen mode)
  int D;
  float scale;
  int64_t wl, wr;
  int bottom_right;
  float rdrop;          // 1 / (1 - dropout_p)
  uint32_t threshold;   // int(dropout_p * 2^24)
  uint32_t seed;
  int vec_q, vec_k, vec_v, vec_do;  // 16-byte vector loads are legal for this tensor
  void* o_out; float* lse;          // forward outputs (contiguous)
  const float* lse_in; float* delta; void* dq; void* dk; void* dv; float* dbias;  // backward
};

// Which rows of the tensors a CTA works on. tb: batch index into the tensors; sb: the contract's "b"
// (sequence index in varlen mode); q0/k0: first row of the sequence; nq/nk: its lengths.
struct Seq {
  int64_t tb, sb, q0, k0, nq, nk;
};

PYATTN_HD Seq get_seq(const Params& p, int z) {
  Seq s;
  if (p.cu_q) {
    s.tb = 0;
    s.sb = z;
    s.q0 = p.cu_q[z];
    s.nq = (int64_t)p.cu_q[z + 1] - s.q0;
    s.k0 = p.cu_k[z];
    s.nk = (int64_t)p.cu_k[z + 1] - s.k0;
  } else {
    s.tb = z;
    s.sb = z;
    s.q0 = 0;
    s.k0 = 0;
    s.nq = p.Nq;
    s.nk = p.Nk;
  }
  return s;
}

// Per-(sequence, head) masking / bias context.
struct Ctx {
  int64_t nq, nk, off, wl, wr;
  float scale, slope;
  bool alibi;
  const uint8_t* kpm; int64_t kpm_sj;
  const void* bias; int bias_dtype; int64_t bias_off, bias_si, bias_sj;
};

PYATTN_HD Ctx make_ctx(const Params& p, const Seq& s, int64_t h) {
  Ctx c;
  c.nq = s.nq;
  c.nk = s.nk;
  c.off = p.bottom_right ? s.nk - s.nq : 0;
  c.wl = p.wl;
  c.wr = p.wr;
  c.scale = p.scale;
  c.alibi = p.alibi != nullptr;
  c.slope = c.alibi ? p.alibi[s.sb * p.alibi_sb + h * p.alibi_sh] : 0.f;
  c.kpm = p.kpm ? p.kpm + s.tb * p.kpm_sb : nullptr;
  c.kpm_sj = p.kpm_sj;
  c.bias = p.bias;
  c.bias_dtype = p.bias_dtype;
  c.bias_off = s.tb * p.bias_sb + h * p.bias_sh;
  c.bias_si = p.bias_si;
  c.bias_sj = p.bias_sj;
  return c;
}

PYATTN_HD float load_bias(const void* b, int dt, int64_t idx) {
  if (dt == 0) return static_cast<const float*>(b)[idx];
  if (dt == 1) return __half2float(static_cast<const __half*>(b)[idx]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(b)[idx]);
}

// s_ij of the contract, or -inf when key j is invisible to query i (i, j local positions).
PYATTN_HD float score(const Ctx& c, float qk, int64_t i, int64_t j) {
  if (i >= c.nq || j >= c.nk) return neg_inf();
  const int64_t ii = i + c.off;
  if (c.wl >= 0 && j < ii - c.wl) return neg_inf();
  if (c.wr >= 0 && j > ii + c.wr) return neg_inf();
  if (c.kpm && !c.kpm[j * c.kpm_sj]) return neg_inf();
  float s = qk * c.scale;
  if (c.bias) s += load_bias(c.bias, c.bias_dtype, c.bias_off + i * c.bias_si + j * c.bias_sj);
  if (c.alibi) s -= c.slope * fabsf((float)(ii - j));
  return s;
}

PYATTN_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

PYATTN_HD uint32_t drop_head_key(const Params& p, const Seq& s, int64_t h) {
  return hash32(p.seed + (uint32_t)(s.sb * p.H + h) * 0x9E3779B9u);
}

PYATTN_HD bool drop_keep(uint32_t row_key, int64_t j, uint32_t threshold) {
  return (hash32(row_key ^ (uint32_t)j) >> 8) >= threshold;
}

// Visible key range of query block [i0, i1] (inclusive, local): [jlo, jhi], empty if jlo > jhi.
PYATTN_HD void key_band(const Ctx& c, int64_t i0, int64_t i1, int64_t& jlo, int64_t& jhi) {
  jlo = 0;
  jhi = c.nk - 1;
  if (c.wl >= 0) jlo = imax(jlo, i0 + c.off - c.wl);
  if (c.wr >= 0) jhi = imin(jhi, i1 + c.off + c.wr);
}

// Query range that can see some key of key block [j0, j1]: [ilo, ihi], empty if ilo > ihi.
PYATTN_HD void query_band(const Ctx& c, int64_t j0, int64_t j1, int64_t& ilo, int64_t& ihi) {
  ilo = 0;
  ihi = c.nq - 1;
  if (c.wr >= 0) ilo = imax(ilo, j0 - c.off - c.wr);
  if (c.wl >= 0) ihi = imin(ihi, j1 + c.wl - c.off);
}

}  // namespace pyattn_attn
