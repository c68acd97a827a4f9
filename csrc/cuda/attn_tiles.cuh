// Shared-memory tiles of the CUDA attention kernels: tile loads, block_gemm (tensor cores via
// nvcuda::wmma for fp16/bf16 on sm_80+, a register-blocked CUDA-core loop otherwise) and the
// per-kernel shared-memory layouts with the tile-size choice under the shared-memory budget.
#pragma once
#include "attn_common.cuh"

namespace pyattn_attn {

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

}  // namespace pyattn_attn
