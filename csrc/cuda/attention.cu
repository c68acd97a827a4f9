// Fused softmax attention on the GPU (plain CUDA, no torch headers), FlashAttention-2 structure.
// Semantics: pyattn/reference/attention.py (scores, visibility, dropout hash, lse, backward formulas).
//
// Forward  : one CTA per (query block of BR rows, head, batch-or-sequence). The CTA walks the key blocks
//            of its band [i0+off-left, i1+off+right] (blocks outside are never touched) with an online
//            softmax; O is accumulated in fp32 shared memory. Writes out (B,H,Nq,D) and lse (B,H,Nq).
// Backward : (1) delta_i = <dout_i, out_i>;
//            (2) one CTA per (key block, kv head, batch): loops over the query heads of its GQA group and
//                over the query blocks of its band, accumulates dK, dV in shared fp32 (deterministic, no
//                atomics; GQA reduction happens inside the CTA), writes dbias (= dS) when requested;
//            (3) one CTA per (query block, head, batch): recomputes S and dP over its band and accumulates dQ.
// Tile products: S = Q K^T, O += P V, dP = dO V^T, dV += P^T dO, dK += dS^T Q, dQ += dS K are all one
// helper, block_gemm, on shared-memory tiles: tensor cores (nvcuda::wmma, fp32 accumulate) for fp16/bf16 on
// sm_80+, a register-blocked CUDA-core loop for fp32 (and for fp16/bf16 on older GPUs).
// Head dims are padded to DP in {64, 128, 256} (zero-filled; a DP=32 variant was dropped to keep the
// nvcc compile of this file, 2 archs x 3 dtypes x 2 dropout flags x 3 kernels, well under a minute). All offsets are int64.
// Everything that differs between dense / causal / window / padded / varlen / bias / alibi is a runtime
// value tested per element (cheap, warp-uniform pointers); dropout is a template flag so dropout_p == 0
// runs no dropout code.
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

// --------------------------------------------------------------------------------------------- tiles
// s[r][c] = g[r * stride_n + c] for r < nrows, c < D; 0 elsewhere (r < ROWS, c < DP).
template <typename T, int ROWS, int DP>
__device__ __forceinline__ void load_tile(T* __restrict__ s, int lds, const T* __restrict__ g, int64_t stride_n,
                                          int64_t nrows, int D, bool vec) {
  if (vec) {  // D % VEC == 0, base and strides 16-byte aligned (checked by the launcher)
    constexpr int VEC = 16 / (int)sizeof(T);
    constexpr int CPR = DP / VEC;
    for (int idx = threadIdx.x; idx < ROWS * CPR; idx += kThreads) {
      const int r = idx / CPR, c = (idx % CPR) * VEC;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r < nrows && c < D) val = *reinterpret_cast<const uint4*>(g + r * stride_n + c);
      *reinterpret_cast<uint4*>(s + r * lds + c) = val;
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * DP; idx += kThreads) {
      const int r = idx / DP, c = idx % DP;
      T val = from_f<T>(0.f);
      if (r < nrows && c < D) val = g[r * stride_n + c];
      s[r * lds + c] = val;
    }
  }
}

template <int ROWS, int COLS>
__device__ __forceinline__ void zero_f32(float* s, int lds) {
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += kThreads) s[(idx / COLS) * lds + idx % COLS] = 0.f;
}

// C[M][N] (+)= op(A)[M][K] * op(B)[K][N]; A(m,k) = A_COL ? A[k*lda+m] : A[m*lda+k];
// B(k,n) = B_COL ? B[n*ldb+k] : B[k*ldb+n]. C fp32 in shared memory; all 128 threads participate;
// the caller synchronises before (inputs ready) and after (C consumed).
template <int M, int N, int K, bool A_COL, bool B_COL, bool ACC, typename T>
__device__ __forceinline__ void gemm_scalar(float* __restrict__ C, int ldc, const T* __restrict__ A, int lda,
                                            const T* __restrict__ B, int ldb) {
  constexpr int TX = 16, TY = kThreads / TX;
  static_assert(M % TY == 0 && N % TX == 0, "gemm_scalar tile shape");
  constexpr int RM = M / TY;
  constexpr int NC = N < 64 ? N : 64;
  static_assert(N % NC == 0 && NC % TX == 0, "gemm_scalar column chunk");
  constexpr int RN = NC / TX;
  const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
#pragma unroll 1
  for (int n0 = 0; n0 < N; n0 += NC) {
    float acc[RM][RN];
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < RN; ++j) acc[i][j] = ACC ? C[(ty + i * TY) * ldc + n0 + tx + j * TX] : 0.f;
#pragma unroll 1
    for (int k = 0; k < K; ++k) {
      float a[RM], b[RN];
#pragma unroll
      for (int i = 0; i < RM; ++i) {
        const int m = ty + i * TY;
        a[i] = to_f<T>(A_COL ? A[k * lda + m] : A[m * lda + k]);
      }
#pragma unroll
      for (int j = 0; j < RN; ++j) {
        const int n = n0 + tx + j * TX;
        b[j] = to_f<T>(B_COL ? B[n * ldb + k] : B[k * ldb + n]);
      }
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < RN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < RN; ++j) C[(ty + i * TY) * ldc + n0 + tx + j * TX] = acc[i][j];
  }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
template <int M, int N, int K, bool A_COL, bool B_COL, bool ACC, typename T>
__device__ __forceinline__ void gemm_wmma(float* C, int ldc, const T* A, int lda, const T* B, int ldb) {
  using namespace nvcuda;
  static_assert(M % 16 == 0 && N % 16 == 0 && K % 16 == 0, "gemm_wmma tile shape");
  using LA = typename std::conditional<A_COL, wmma::col_major, wmma::row_major>::type;
  using LB = typename std::conditional<B_COL, wmma::col_major, wmma::row_major>::type;
  constexpr int TM = M / 16, TN = N / 16;
  const int warp = threadIdx.x >> 5;
#pragma unroll 1
  for (int t = warp; t < TM * TN; t += kWarps) {
    const int tm = t / TN, tn = t % TN;
    float* cp = C + tm * 16 * ldc + tn * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    if (ACC) wmma::load_matrix_sync(c, cp, ldc, wmma::mem_row_major);
    else wmma::fill_fragment(c, 0.f);
#pragma unroll 2
    for (int k = 0; k < K; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> b;
      wmma::load_matrix_sync(a, A_COL ? A + k * lda + tm * 16 : A + tm * 16 * lda + k, lda);
      wmma::load_matrix_sync(b, B_COL ? B + tn * 16 * ldb + k : B + k * ldb + tn * 16, ldb);
      wmma::mma_sync(c, a, b, c);
    }
    wmma::store_matrix_sync(cp, c, ldc, wmma::mem_row_major);
  }
}
#endif

template <int M, int N, int K, bool A_COL, bool B_COL, bool ACC, typename T>
__device__ __forceinline__ void block_gemm(float* C, int ldc, const T* A, int lda, const T* B, int ldb) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (!std::is_same<T, float>::value) {
    gemm_wmma<M, N, K, A_COL, B_COL, ACC, T>(C, ldc, A, lda, B, ldb);
    return;
  } else
#endif
  {
    gemm_scalar<M, N, K, A_COL, B_COL, ACC, T>(C, ldc, A, lda, B, ldb);
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// --------------------------------------------------------------------------------------------- layouts
template <typename T, int DP, int BR, int BC>
struct FwdLayout {
  static constexpr int LDT = DP + pad_of<T>(), LDO = DP + 4, LDS = BC + 4, LDP = BC + pad_of<T>();
  static constexpr size_t oQ = 0;
  static constexpr size_t oK = align128(oQ + sizeof(T) * BR * LDT);
  static constexpr size_t oV = align128(oK + sizeof(T) * BC * LDT);
  static constexpr size_t oO = align128(oV + sizeof(T) * BC * LDT);
  static constexpr size_t oS = align128(oO + sizeof(float) * BR * LDO);
  static constexpr size_t oP = align128(oS + sizeof(float) * BR * LDS);
  static constexpr size_t oM = align128(oP + sizeof(T) * BR * LDP);
  static constexpr size_t oL = oM + sizeof(float) * BR;
  static constexpr size_t oA = oL + sizeof(float) * BR;
  static constexpr size_t bytes = align128(oA + sizeof(float) * BR);
};

template <typename T, int DP, int BR, int BC>
struct DqLayout {
  static constexpr int LDT = DP + pad_of<T>(), LDO = DP + 4, LDS = BC + 4, LDP = BC + pad_of<T>();
  static constexpr size_t oQ = 0;
  static constexpr size_t oDO = align128(oQ + sizeof(T) * BR * LDT);
  static constexpr size_t oK = align128(oDO + sizeof(T) * BR * LDT);
  static constexpr size_t oV = align128(oK + sizeof(T) * BC * LDT);
  static constexpr size_t oDQ = align128(oV + sizeof(T) * BC * LDT);
  static constexpr size_t oS = align128(oDQ + sizeof(float) * BR * LDO);
  static constexpr size_t oDP = align128(oS + sizeof(float) * BR * LDS);
  static constexpr size_t oDS = align128(oDP + sizeof(float) * BR * LDS);
  static constexpr size_t oLSE = align128(oDS + sizeof(T) * BR * LDP);
  static constexpr size_t oDEL = oLSE + sizeof(float) * BR;
  static constexpr size_t bytes = align128(oDEL + sizeof(float) * BR);
};

template <typename T, int DP, int BR, int BC>
struct DkvLayout {
  static constexpr int LDT = DP + pad_of<T>(), LDO = DP + 4, LDS = BC + 4, LDP = BC + pad_of<T>();
  static constexpr size_t oK = 0;
  static constexpr size_t oV = align128(oK + sizeof(T) * BC * LDT);
  static constexpr size_t oQ = align128(oV + sizeof(T) * BC * LDT);
  static constexpr size_t oDO = align128(oQ + sizeof(T) * BR * LDT);
  static constexpr size_t oDK = align128(oDO + sizeof(T) * BR * LDT);
  static constexpr size_t oDV = align128(oDK + sizeof(float) * BC * LDO);
  static constexpr size_t oS = align128(oDV + sizeof(float) * BC * LDO);
  static constexpr size_t oDP = align128(oS + sizeof(float) * BR * LDS);
  static constexpr size_t oP = align128(oDP + sizeof(float) * BR * LDS);
  static constexpr size_t oDS = align128(oP + sizeof(T) * BR * LDP);
  static constexpr size_t oLSE = align128(oDS + sizeof(T) * BR * LDP);
  static constexpr size_t oDEL = oLSE + sizeof(float) * BR;
  static constexpr size_t bytes = align128(oDEL + sizeof(float) * BR);
};

// Largest tile (BR, BC) from a fixed preference list whose layout fits the budget.
template <template <typename, int, int, int> class L, typename T, int DP>
struct PickTiles {
  static constexpr bool f0 = L<T, DP, 64, 64>::bytes <= kSmemBudget;
  static constexpr bool f1 = L<T, DP, 64, 32>::bytes <= kSmemBudget;
  static constexpr bool f2 = L<T, DP, 32, 64>::bytes <= kSmemBudget;
  static constexpr bool f3 = L<T, DP, 32, 32>::bytes <= kSmemBudget;
  static constexpr bool f4 = L<T, DP, 32, 16>::bytes <= kSmemBudget;
  static constexpr int BR = f0 ? 64 : f1 ? 64 : f2 ? 32 : f3 ? 32 : f4 ? 32 : 16;
  static constexpr int BC = f0 ? 64 : f1 ? 32 : f2 ? 64 : f3 ? 32 : 16;
  static constexpr size_t bytes = L<T, DP, BR, BC>::bytes;
  static_assert(bytes <= kSmemHardLimit, "attention tile does not fit shared memory");
};

// --------------------------------------------------------------------------------------------- forward
template <typename T, int DP, int BR, int BC, bool kDrop>
__global__ void __launch_bounds__(kThreads, 1) attn_fwd_kernel(const Params p) {
  using L = FwdLayout<T, DP, BR, BC>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem + L::oQ);
  T* sK = reinterpret_cast<T*>(smem + L::oK);
  T* sV = reinterpret_cast<T*>(smem + L::oV);
  float* sO = reinterpret_cast<float*>(smem + L::oO);
  float* sS = reinterpret_cast<float*>(smem + L::oS);
  T* sP = reinterpret_cast<T*>(smem + L::oP);
  float* sM = reinterpret_cast<float*>(smem + L::oM);
  float* sL = reinterpret_cast<float*>(smem + L::oL);
  float* sA = reinterpret_cast<float*>(smem + L::oA);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t h = blockIdx.y;
  const Seq sq = get_seq(p, blockIdx.z);
  const int64_t i0 = (int64_t)blockIdx.x * BR;
  if (i0 >= sq.nq) return;
  const int64_t hk = h / (p.H / p.Hkv);
  const Ctx c = make_ctx(p, sq, h);

  const T* Qg = static_cast<const T*>(p.q) + sq.tb * p.q_sb + h * p.q_sh + (sq.q0 + i0) * p.q_sn;
  const T* Kg = static_cast<const T*>(p.k) + sq.tb * p.k_sb + hk * p.k_sh + sq.k0 * p.k_sn;
  const T* Vg = static_cast<const T*>(p.v) + sq.tb * p.v_sb + hk * p.v_sh + sq.k0 * p.v_sn;

  const int64_t i1 = min(i0 + BR, sq.nq) - 1;
  int64_t jlo, jhi;
  key_band(c, i0, i1, jlo, jhi);

  load_tile<T, BR, DP>(sQ, L::LDT, Qg, p.q_sn, sq.nq - i0, p.D, p.vec_q);
  zero_f32<BR, DP>(sO, L::LDO);
  for (int r = tid; r < BR; r += kThreads) {
    sM[r] = neg_inf();
    sL[r] = 0.f;
  }
  const uint32_t head_key = kDrop ? drop_head_key(p, sq, h) : 0u;

  if (jlo <= jhi) {
    for (int64_t kb = jlo / BC; kb <= jhi / BC; ++kb) {
      const int64_t j0 = kb * BC;
      __syncthreads();  // previous block's sK/sV/sP are consumed
      load_tile<T, BC, DP>(sK, L::LDT, Kg + j0 * p.k_sn, p.k_sn, sq.nk - j0, p.D, p.vec_k);
      load_tile<T, BC, DP>(sV, L::LDT, Vg + j0 * p.v_sn, p.v_sn, sq.nk - j0, p.D, p.vec_v);
      __syncthreads();
      block_gemm<BR, BC, DP, false, true, false, T>(sS, L::LDS, sQ, L::LDT, sK, L::LDT);  // S = Q K^T
      __syncthreads();
      // online softmax: one warp per row, lanes over columns
      constexpr int CPL = (BC + 31) / 32;
      for (int r = warp; r < BR; r += kWarps) {
        const int64_t i = i0 + r;
        float vals[CPL];
        float mx = neg_inf();
#pragma unroll
        for (int t = 0; t < CPL; ++t) {
          const int cc = lane + 32 * t;
          float s = neg_inf();
          if (cc < BC) s = score(c, sS[r * L::LDS + cc], i, j0 + cc);
          vals[t] = s;
          mx = fmaxf(mx, s);
        }
        mx = warp_max(mx);
        const float m_old = sM[r];
        const float m_new = fmaxf(m_old, mx);
        const float alpha = (m_old == neg_inf()) ? 0.f : __expf(m_old - m_new);
        const uint32_t row_key = kDrop ? hash32(head_key ^ (uint32_t)i) : 0u;
        float sum = 0.f;
#pragma unroll
        for (int t = 0; t < CPL; ++t) {
          const int cc = lane + 32 * t;
          if (cc < BC) {
            const float pr = (vals[t] == neg_inf()) ? 0.f : __expf(vals[t] - m_new);
            sum += pr;
            float pd = pr;
            if constexpr (kDrop) pd = drop_keep(row_key, j0 + cc, p.threshold) ? pr * p.rdrop : 0.f;
            sP[r * L::LDP + cc] = from_f<T>(pd);
          }
        }
        sum = warp_sum(sum);
        if (lane == 0) {
          sM[r] = m_new;
          sL[r] = sL[r] * alpha + sum;
          sA[r] = alpha;
        }
      }
      __syncthreads();
      for (int idx = tid; idx < BR * DP; idx += kThreads) {
        const int r = idx / DP;
        sO[r * L::LDO + idx % DP] *= sA[r];
      }
      __syncthreads();
      block_gemm<BR, DP, BC, false, false, true, T>(sO, L::LDO, sP, L::LDP, sV, L::LDT);  // O += P V
    }
  }
  __syncthreads();
  const int64_t row_base = (sq.tb * p.H + h) * p.Nq + sq.q0 + i0;  // row index into out / lse
  const int64_t nrows = min((int64_t)BR, sq.nq - i0);
  for (int r = tid; r < BR; r += kThreads) {
    const float l = sL[r];
    sA[r] = l > 0.f ? 1.f / l : 0.f;
    if (r < nrows) p.lse[row_base + r] = l > 0.f ? sM[r] + logf(l) : neg_inf();
  }
  __syncthreads();
  T* Og = static_cast<T*>(p.o_out) + row_base * p.D;
  for (int idx = tid; idx < BR * DP; idx += kThreads) {
    const int r = idx / DP, cc = idx % DP;
    if (r < nrows && cc < p.D) Og[(int64_t)r * p.D + cc] = from_f<T>(sO[r * L::LDO + cc] * sA[r]);
  }
}

// --------------------------------------------------------------------------------------------- backward
// delta[row] = sum_d dout[row, d] * out[row, d]; one warp per (b, h, n) row.
template <typename T>
__global__ void __launch_bounds__(kThreads) attn_bwd_delta_kernel(const Params p) {
  const int64_t row = (int64_t)blockIdx.x * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= p.B * p.H * p.Nq) return;
  const int64_t n = row % p.Nq, bh = row / p.Nq;
  const int64_t h = bh % p.H, b = bh / p.H;
  const T* dO = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + n * p.do_sn;
  const T* O = static_cast<const T*>(p.out) + b * p.o_sb + h * p.o_sh + n * p.o_sn;
  float s = 0.f;
  for (int d = lane; d < p.D; d += 32) s += to_f<T>(dO[d]) * to_f<T>(O[d]);
  s = warp_sum(s);
  if (lane == 0) p.delta[row] = s;
}

// Element-wise part shared by both backward kernels: from S (raw q.k) and dPd (dout.v) build
// P (with dropout applied, for dV) and dS. Writes dS to dbias when requested.
template <typename T, int BR, int BC, int LDS, int LDP, bool kDrop, bool kWantP>
__device__ __forceinline__ void bwd_elementwise(const Params& p, const Ctx& c, const Seq& sq, int64_t h,
                                                uint32_t head_key, int64_t i0, int64_t j0, const float* sS,
                                                const float* sDP, const float* sLse, const float* sDel, T* sP,
                                                T* sDS, float* dbias) {
  const int64_t dbias_row0 = (sq.tb * p.H + h) * p.Nq + sq.q0;
  for (int idx = threadIdx.x; idx < BR * BC; idx += kThreads) {
    const int r = idx / BC, cc = idx % BC;
    const int64_t i = i0 + r, j = j0 + cc;
    const float s = score(c, sS[r * LDS + cc], i, j);
    const float lse = sLse[r];
    const float pr = (s == neg_inf() || lse == neg_inf()) ? 0.f : __expf(s - lse);
    float dp = sDP[r * LDS + cc];
    float pd = pr;
    if constexpr (kDrop) {
      const bool keep = drop_keep(hash32(head_key ^ (uint32_t)i), j, p.threshold);
      pd = keep ? pr * p.rdrop : 0.f;
      dp = keep ? dp * p.rdrop : 0.f;
    }
    const float ds = pr * (dp - sDel[r]);
    if constexpr (kWantP) sP[r * LDP + cc] = from_f<T>(pd);
    sDS[r * LDP + cc] = from_f<T>(ds);
    if (dbias && i < c.nq && j < c.nk) dbias[(dbias_row0 + i) * p.Nk + sq.k0 + j] = ds;
  }
}

template <typename T, int DP, int BR, int BC, bool kDrop>
__global__ void __launch_bounds__(kThreads, 1) attn_bwd_dkdv_kernel(const Params p) {
  using L = DkvLayout<T, DP, BR, BC>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem + L::oK);
  T* sV = reinterpret_cast<T*>(smem + L::oV);
  T* sQ = reinterpret_cast<T*>(smem + L::oQ);
  T* sDO = reinterpret_cast<T*>(smem + L::oDO);
  float* sDK = reinterpret_cast<float*>(smem + L::oDK);
  float* sDV = reinterpret_cast<float*>(smem + L::oDV);
  float* sS = reinterpret_cast<float*>(smem + L::oS);
  float* sDP = reinterpret_cast<float*>(smem + L::oDP);
  T* sP = reinterpret_cast<T*>(smem + L::oP);
  T* sDS = reinterpret_cast<T*>(smem + L::oDS);
  float* sLse = reinterpret_cast<float*>(smem + L::oLSE);
  float* sDel = reinterpret_cast<float*>(smem + L::oDEL);

  const int tid = threadIdx.x;
  const int64_t hk = blockIdx.y;
  const Seq sq = get_seq(p, blockIdx.z);
  const int64_t j0 = (int64_t)blockIdx.x * BC;
  if (j0 >= sq.nk) return;
  const int64_t j1 = min(j0 + BC, sq.nk) - 1;

  const T* Kg = static_cast<const T*>(p.k) + sq.tb * p.k_sb + hk * p.k_sh + (sq.k0 + j0) * p.k_sn;
  const T* Vg = static_cast<const T*>(p.v) + sq.tb * p.v_sb + hk * p.v_sh + (sq.k0 + j0) * p.v_sn;
  load_tile<T, BC, DP>(sK, L::LDT, Kg, p.k_sn, sq.nk - j0, p.D, p.vec_k);
  load_tile<T, BC, DP>(sV, L::LDT, Vg, p.v_sn, sq.nk - j0, p.D, p.vec_v);
  zero_f32<BC, DP>(sDK, L::LDO);
  zero_f32<BC, DP>(sDV, L::LDO);

  const int64_t G = p.H / p.Hkv;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    const Ctx c = make_ctx(p, sq, h);
    int64_t ilo, ihi;
    query_band(c, j0, j1, ilo, ihi);
    if (ilo > ihi) continue;
    const uint32_t head_key = kDrop ? drop_head_key(p, sq, h) : 0u;
    const T* Qg = static_cast<const T*>(p.q) + sq.tb * p.q_sb + h * p.q_sh + sq.q0 * p.q_sn;
    const T* DOg = static_cast<const T*>(p.dout) + sq.tb * p.do_sb + h * p.do_sh + sq.q0 * p.do_sn;
    const int64_t row_base = (sq.tb * p.H + h) * p.Nq + sq.q0;
    for (int64_t qb = ilo / BR; qb <= ihi / BR; ++qb) {
      const int64_t i0 = qb * BR;
      __syncthreads();  // previous tiles consumed
      load_tile<T, BR, DP>(sQ, L::LDT, Qg + i0 * p.q_sn, p.q_sn, sq.nq - i0, p.D, p.vec_q);
      load_tile<T, BR, DP>(sDO, L::LDT, DOg + i0 * p.do_sn, p.do_sn, sq.nq - i0, p.D, p.vec_do);
      for (int r = tid; r < BR; r += kThreads) {
        const bool in = i0 + r < sq.nq;
        sLse[r] = in ? p.lse_in[row_base + i0 + r] : neg_inf();
        sDel[r] = in ? p.delta[row_base + i0 + r] : 0.f;
      }
      __syncthreads();
      block_gemm<BR, BC, DP, false, true, false, T>(sS, L::LDS, sQ, L::LDT, sK, L::LDT);    // S = Q K^T
      block_gemm<BR, BC, DP, false, true, false, T>(sDP, L::LDS, sDO, L::LDT, sV, L::LDT);  // dP = dO V^T
      __syncthreads();
      bwd_elementwise<T, BR, BC, L::LDS, L::LDP, kDrop, true>(p, c, sq, h, head_key, i0, j0, sS, sDP, sLse, sDel,
                                                              sP, sDS, p.dbias);
      __syncthreads();
      block_gemm<BC, DP, BR, true, false, true, T>(sDV, L::LDO, sP, L::LDP, sDO, L::LDT);  // dV += P^T dO
      block_gemm<BC, DP, BR, true, false, true, T>(sDK, L::LDO, sDS, L::LDP, sQ, L::LDT);  // dK += dS^T Q
    }
  }
  __syncthreads();
  const int64_t out_row = (sq.tb * p.Hkv + hk) * p.Nk + sq.k0 + j0;
  T* dKg = static_cast<T*>(p.dk) + out_row * p.D;
  T* dVg = static_cast<T*>(p.dv) + out_row * p.D;
  const int64_t nrows = j1 - j0 + 1;
  for (int idx = tid; idx < BC * DP; idx += kThreads) {
    const int r = idx / DP, cc = idx % DP;
    if (r < nrows && cc < p.D) {
      dKg[(int64_t)r * p.D + cc] = from_f<T>(sDK[r * L::LDO + cc] * p.scale);
      dVg[(int64_t)r * p.D + cc] = from_f<T>(sDV[r * L::LDO + cc]);
    }
  }
}

template <typename T, int DP, int BR, int BC, bool kDrop>
__global__ void __launch_bounds__(kThreads, 1) attn_bwd_dq_kernel(const Params p) {
  using L = DqLayout<T, DP, BR, BC>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem + L::oQ);
  T* sDO = reinterpret_cast<T*>(smem + L::oDO);
  T* sK = reinterpret_cast<T*>(smem + L::oK);
  T* sV = reinterpret_cast<T*>(smem + L::oV);
  float* sDQ = reinterpret_cast<float*>(smem + L::oDQ);
  float* sS = reinterpret_cast<float*>(smem + L::oS);
  float* sDP = reinterpret_cast<float*>(smem + L::oDP);
  T* sDS = reinterpret_cast<T*>(smem + L::oDS);
  float* sLse = reinterpret_cast<float*>(smem + L::oLSE);
  float* sDel = reinterpret_cast<float*>(smem + L::oDEL);

  const int tid = threadIdx.x;
  const int64_t h = blockIdx.y;
  const Seq sq = get_seq(p, blockIdx.z);
  const int64_t i0 = (int64_t)blockIdx.x * BR;
  if (i0 >= sq.nq) return;
  const int64_t hk = h / (p.H / p.Hkv);
  const Ctx c = make_ctx(p, sq, h);
  const int64_t i1 = min(i0 + BR, sq.nq) - 1;
  int64_t jlo, jhi;
  key_band(c, i0, i1, jlo, jhi);
  const uint32_t head_key = kDrop ? drop_head_key(p, sq, h) : 0u;
  const int64_t row_base = (sq.tb * p.H + h) * p.Nq + sq.q0 + i0;

  const T* Qg = static_cast<const T*>(p.q) + sq.tb * p.q_sb + h * p.q_sh + (sq.q0 + i0) * p.q_sn;
  const T* DOg = static_cast<const T*>(p.dout) + sq.tb * p.do_sb + h * p.do_sh + (sq.q0 + i0) * p.do_sn;
  const T* Kg = static_cast<const T*>(p.k) + sq.tb * p.k_sb + hk * p.k_sh + sq.k0 * p.k_sn;
  const T* Vg = static_cast<const T*>(p.v) + sq.tb * p.v_sb + hk * p.v_sh + sq.k0 * p.v_sn;
  load_tile<T, BR, DP>(sQ, L::LDT, Qg, p.q_sn, sq.nq - i0, p.D, p.vec_q);
  load_tile<T, BR, DP>(sDO, L::LDT, DOg, p.do_sn, sq.nq - i0, p.D, p.vec_do);
  zero_f32<BR, DP>(sDQ, L::LDO);
  for (int r = tid; r < BR; r += kThreads) {
    const bool in = i0 + r < sq.nq;
    sLse[r] = in ? p.lse_in[row_base + r] : neg_inf();
    sDel[r] = in ? p.delta[row_base + r] : 0.f;
  }
  if (jlo <= jhi) {
    for (int64_t kb = jlo / BC; kb <= jhi / BC; ++kb) {
      const int64_t j0 = kb * BC;
      __syncthreads();
      load_tile<T, BC, DP>(sK, L::LDT, Kg + j0 * p.k_sn, p.k_sn, sq.nk - j0, p.D, p.vec_k);
      load_tile<T, BC, DP>(sV, L::LDT, Vg + j0 * p.v_sn, p.v_sn, sq.nk - j0, p.D, p.vec_v);
      __syncthreads();
      block_gemm<BR, BC, DP, false, true, false, T>(sS, L::LDS, sQ, L::LDT, sK, L::LDT);    // S = Q K^T
      block_gemm<BR, BC, DP, false, true, false, T>(sDP, L::LDS, sDO, L::LDT, sV, L::LDT);  // dP = dO V^T
      __syncthreads();
      // dbias is written by the dK/dV kernel; this pass only needs dS
      bwd_elementwise<T, BR, BC, L::LDS, L::LDP, kDrop, false>(p, c, sq, h, head_key, i0, j0, sS, sDP, sLse, sDel,
                                                               nullptr, sDS, nullptr);
      __syncthreads();
      block_gemm<BR, DP, BC, false, false, true, T>(sDQ, L::LDO, sDS, L::LDP, sK, L::LDT);  // dQ += dS K
    }
  }
  __syncthreads();
  T* dQg = static_cast<T*>(p.dq) + row_base * p.D;
  const int64_t nrows = i1 - i0 + 1;
  for (int idx = tid; idx < BR * DP; idx += kThreads) {
    const int r = idx / DP, cc = idx % DP;
    if (r < nrows && cc < p.D) dQg[(int64_t)r * p.D + cc] = from_f<T>(sDQ[r * L::LDO + cc] * p.scale);
  }
}

// --------------------------------------------------------------------------------------------- launch
template <typename Kernel>
cudaError_t prepare_smem(Kernel kernel, size_t bytes) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  int optin = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  if ((size_t)optin < bytes) return cudaErrorInvalidConfiguration;  // tile does not fit this GPU
  if (bytes > 48 * 1024) return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
  return cudaSuccess;
}

inline bool grid_ok(int64_t x, int64_t y, int64_t z) {
  return x >= 1 && x <= 2147483647LL && y >= 1 && y <= 65535 && z >= 1 && z <= 65535;
}

template <typename T, int DP, bool kDrop>
cudaError_t launch_fwd(const Params& p, int64_t nz, int64_t maxq, cudaStream_t stream) {
  using C = PickTiles<FwdLayout, T, DP>;
  auto kernel = attn_fwd_kernel<T, DP, C::BR, C::BC, kDrop>;
  const int64_t gx = (maxq + C::BR - 1) / C::BR;
  if (gx == 0) return cudaSuccess;
  if (!grid_ok(gx, p.H, nz)) return cudaErrorInvalidConfiguration;
  cudaError_t err = prepare_smem(kernel, C::bytes);
  if (err != cudaSuccess) return err;
  kernel<<<dim3((unsigned)gx, (unsigned)p.H, (unsigned)nz), kThreads, C::bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int DP, bool kDrop>
cudaError_t launch_bwd(const Params& p, int64_t nz, int64_t maxq, int64_t maxk, cudaStream_t stream) {
  const int64_t rows = p.B * p.H * p.Nq;
  if (rows > 0) {
    attn_bwd_delta_kernel<T><<<(unsigned)((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  {
    using C = PickTiles<DkvLayout, T, DP>;
    auto kernel = attn_bwd_dkdv_kernel<T, DP, C::BR, C::BC, kDrop>;
    const int64_t gx = (maxk + C::BC - 1) / C::BC;
    if (gx > 0) {
      if (!grid_ok(gx, p.Hkv, nz)) return cudaErrorInvalidConfiguration;
      cudaError_t err = prepare_smem(kernel, C::bytes);
      if (err != cudaSuccess) return err;
      kernel<<<dim3((unsigned)gx, (unsigned)p.Hkv, (unsigned)nz), kThreads, C::bytes, stream>>>(p);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  {
    using C = PickTiles<DqLayout, T, DP>;
    auto kernel = attn_bwd_dq_kernel<T, DP, C::BR, C::BC, kDrop>;
    const int64_t gx = (maxq + C::BR - 1) / C::BR;
    if (gx > 0) {
      if (!grid_ok(gx, p.H, nz)) return cudaErrorInvalidConfiguration;
      cudaError_t err = prepare_smem(kernel, C::bytes);
      if (err != cudaSuccess) return err;
      kernel<<<dim3((unsigned)gx, (unsigned)p.H, (unsigned)nz), kThreads, C::bytes, stream>>>(p);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

template <typename T, bool kBwd>
cudaError_t dispatch_dp(const Params& p, bool drop, int64_t nz, int64_t maxq, int64_t maxk, cudaStream_t stream) {
#define PYATTN_ATTN_CASE(DPV)                                                              \
  if (p.D <= DPV) {                                                                        \
    if constexpr (kBwd) {                                                                  \
      return drop ? launch_bwd<T, DPV, true>(p, nz, maxq, maxk, stream)                    \
                  : launch_bwd<T, DPV, false>(p, nz, maxq, maxk, stream);                  \
    } else {                                                                               \
      return drop ? launch_fwd<T, DPV, true>(p, nz, maxq, stream)                          \
                  : launch_fwd<T, DPV, false>(p, nz, maxq, stream);                        \
    }                                                                                      \
  }
  PYATTN_ATTN_CASE(64)
  PYATTN_ATTN_CASE(128)
  PYATTN_ATTN_CASE(256)
#undef PYATTN_ATTN_CASE
  return cudaErrorInvalidValue;
}

inline bool vec_ok(const void* ptr, const int64_t* st, int64_t D, int esize) {
  const int64_t vec = 16 / esize;
  if (ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) % 16) != 0 || D % vec != 0) return false;
  for (int i = 0; i < 3; ++i)
    if (st[i] % vec != 0) return false;
  return true;
}

// Fills everything except the backward-only fields.
inline cudaError_t fill_common(Params& p, int dtype, const void* q, const int64_t* q_st, const void* k,
                               const int64_t* k_st, const void* v, const int64_t* v_st, const void* bias,
                               int bias_dtype, const int64_t* bias_st, const float* alibi, const int64_t* alibi_st,
                               const uint8_t* kpm, const int64_t* kpm_st, const int32_t* cu_q, const int32_t* cu_k,
                               int64_t B, int64_t H, int64_t Hkv, int64_t Nq, int64_t Nk, int64_t D, float scale,
                               int64_t wl, int64_t wr, int bottom_right, float dropout_p, int64_t threshold,
                               int64_t seed) {
  if (dtype < 0 || dtype > 2 || D < 1 || D > 256 || Hkv < 1 || H % Hkv != 0) return cudaErrorInvalidValue;
  if ((cu_q == nullptr) != (cu_k == nullptr)) return cudaErrorInvalidValue;
  const int esize = dtype == 0 ? 4 : 2;
  Params z = {};
  p = z;
  p.q = q; p.k = k; p.v = v;
  p.q_sb = q_st[0]; p.q_sh = q_st[1]; p.q_sn = q_st[2];
  p.k_sb = k_st[0]; p.k_sh = k_st[1]; p.k_sn = k_st[2];
  p.v_sb = v_st[0]; p.v_sh = v_st[1]; p.v_sn = v_st[2];
  p.bias = bias;
  p.bias_dtype = bias_dtype;
  if (bias) {
    p.bias_sb = bias_st[0]; p.bias_sh = bias_st[1]; p.bias_si = bias_st[2]; p.bias_sj = bias_st[3];
  }
  p.alibi = alibi;
  if (alibi) {
    p.alibi_sb = alibi_st[0]; p.alibi_sh = alibi_st[1];
  }
  p.kpm = kpm;
  if (kpm) {
    p.kpm_sb = kpm_st[0]; p.kpm_sj = kpm_st[1];
  }
  p.cu_q = cu_q; p.cu_k = cu_k;
  p.B = B; p.H = H; p.Hkv = Hkv; p.Nq = Nq; p.Nk = Nk; p.D = (int)D;
  p.scale = scale;
  p.wl = wl; p.wr = wr; p.bottom_right = bottom_right;
  p.rdrop = dropout_p > 0.f ? 1.f / (1.f - dropout_p) : 1.f;
  p.threshold = (uint32_t)threshold;
  p.seed = (uint32_t)seed;
  p.vec_q = vec_ok(q, q_st, D, esize);
  p.vec_k = vec_ok(k, k_st, D, esize);
  p.vec_v = vec_ok(v, v_st, D, esize);
  return cudaSuccess;
}

}  // namespace pyattn_attn

extern "C" {

// q: (B, H, Nq, D), k/v: (B, Hkv, Nk, D), strides [b, h, n] in elements, unit stride over D.
// bias: (B, H, Nq, Nk) strides [b, h, i, j] (0 for broadcast dims), bias_dtype 0/1/2; alibi fp32 strides [b, h];
// kpm (bool as uint8) strides [b, j]; cu_q/cu_k int32 (num_seqs + 1) for varlen (then B == 1 and Nq/Nk are
// the totals). out: contiguous (B, H, Nq, D) in q's dtype; lse: contiguous fp32 (B, H, Nq).
// Dropout code runs only when dropout_p > 0 (keep_ij = hash >= dropout_threshold = int(dropout_p * 2^24)).
cudaError_t pyattn_cuda_attention_fwd(int dtype, const void* q, const int64_t* q_st, const void* k,
                                      const int64_t* k_st, const void* v, const int64_t* v_st, const void* bias,
                                      int bias_dtype, const int64_t* bias_st, const float* alibi,
                                      const int64_t* alibi_st, const uint8_t* kpm, const int64_t* kpm_st,
                                      const int32_t* cu_q, const int32_t* cu_k, int64_t num_seqs, int64_t B, int64_t H,
                                      int64_t Hkv, int64_t Nq, int64_t Nk, int64_t D, int64_t max_seqlen_q,
                                      int64_t max_seqlen_k, float scale, int64_t window_left, int64_t window_right,
                                      int bottom_right, float dropout_p, int64_t dropout_threshold, int64_t seed,
                                      void* out, float* lse, cudaStream_t stream) {
  using namespace pyattn_attn;
  (void)max_seqlen_k;
  Params p;
  cudaError_t err = fill_common(p, dtype, q, q_st, k, k_st, v, v_st, bias, bias_dtype, bias_st, alibi, alibi_st, kpm,
                                kpm_st, cu_q, cu_k, B, H, Hkv, Nq, Nk, D, scale, window_left, window_right,
                                bottom_right, dropout_p, dropout_threshold, seed);
  if (err != cudaSuccess) return err;
  p.o_out = out;
  p.lse = lse;
  const bool varlen = cu_q != nullptr;
  const int64_t nz = varlen ? num_seqs : B;
  const int64_t maxq = varlen ? max_seqlen_q : Nq;
  if (nz <= 0 || H <= 0 || maxq <= 0) return cudaSuccess;
  const bool drop = dropout_p > 0.f;
  switch (dtype) {
    case 0: return dispatch_dp<float, false>(p, drop, nz, maxq, 0, stream);
    case 1: return dispatch_dp<__half, false>(p, drop, nz, maxq, 0, stream);
    default: return dispatch_dp<__nv_bfloat16, false>(p, drop, nz, maxq, 0, stream);
  }
}

// Backward. dout/out: (B, H, Nq, D) strides [b, h, n]; lse: contiguous fp32 (B, H, Nq) from the forward.
// delta_ws: fp32 workspace of B*H*Nq. dq (B, H, Nq, D), dk/dv (B, Hkv, Nk, D): contiguous, fully written
// (every row of every sequence). dbias: nullable zero-initialised contiguous fp32 (B, H, Nq, Nk) = dS.
cudaError_t pyattn_cuda_attention_bwd(int dtype, const void* dout, const int64_t* do_st, const void* q,
                                      const int64_t* q_st, const void* k, const int64_t* k_st, const void* v,
                                      const int64_t* v_st, const void* out, const int64_t* o_st, const float* lse,
                                      const void* bias, int bias_dtype, const int64_t* bias_st, const float* alibi,
                                      const int64_t* alibi_st, const uint8_t* kpm, const int64_t* kpm_st,
                                      const int32_t* cu_q, const int32_t* cu_k, int64_t num_seqs, int64_t B, int64_t H,
                                      int64_t Hkv, int64_t Nq, int64_t Nk, int64_t D, int64_t max_seqlen_q,
                                      int64_t max_seqlen_k, float scale, int64_t window_left, int64_t window_right,
                                      int bottom_right, float dropout_p, int64_t dropout_threshold, int64_t seed,
                                      float* delta_ws, void* dq, void* dk, void* dv, float* dbias,
                                      cudaStream_t stream) {
  using namespace pyattn_attn;
  Params p;
  cudaError_t err = fill_common(p, dtype, q, q_st, k, k_st, v, v_st, bias, bias_dtype, bias_st, alibi, alibi_st, kpm,
                                kpm_st, cu_q, cu_k, B, H, Hkv, Nq, Nk, D, scale, window_left, window_right,
                                bottom_right, dropout_p, dropout_threshold, seed);
  if (err != cudaSuccess) return err;
  p.dout = dout;
  p.do_sb = do_st[0]; p.do_sh = do_st[1]; p.do_sn = do_st[2];
  p.out = out;
  p.o_sb = o_st[0]; p.o_sh = o_st[1]; p.o_sn = o_st[2];
  p.vec_do = vec_ok(dout, do_st, D, dtype == 0 ? 4 : 2);
  p.lse_in = lse;
  p.delta = delta_ws;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  p.dbias = dbias;
  const bool varlen = cu_q != nullptr;
  const int64_t nz = varlen ? num_seqs : B;
  const int64_t maxq = varlen ? max_seqlen_q : Nq;
  const int64_t maxk = varlen ? max_seqlen_k : Nk;
  if (nz <= 0 || H <= 0) return cudaSuccess;
  const bool drop = dropout_p > 0.f;
  switch (dtype) {
    case 0: return dispatch_dp<float, true>(p, drop, nz, maxq, maxk, stream);
    case 1: return dispatch_dp<__half, true>(p, drop, nz, maxq, maxk, stream);
    default: return dispatch_dp<__nv_bfloat16, true>(p, drop, nz, maxq, maxk, stream);
  }
}

}  // extern "C"
