// KV-cache decoding attention in CUDA (semantics: pyattn/reference/decode.py).
//
// decode_split_kernel: grid (B * Hkv, splits, row groups), 4 warps. A program takes one kv head of one
// sequence, one slice of its keys and up to kRows of the (H / Hkv) * Nq query rows sharing that kv head
// (GQA grouping: each K/V row is loaded once for all of them). Each warp walks every 4th key; a lane holds
// DPL consecutive elements of the head dim, so a warp reads a whole K/V row in one coalesced access.
// The scores are warp-shuffle reductions, the softmax is online per warp, and the four warps merge
// through shared memory. With several splits each program writes a normalised partial and its
// log-sum-exp and decode_combine_kernel merges them. decode_append_kernel writes new K/V rows into the
// cache (contiguous, or through the block table when paged).
//
// Plain .cu: raw pointers, int64 strides and a stream; the torch binding is csrc/cuda_binding.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <math_constants.h>

namespace {

constexpr int kWarps = 4;
constexpr int kRows = 8;  // query rows per program

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

struct DecodeParams {
  const void* q;
  int64_t q_sb, q_sh, q_sn;
  const void* k;
  const void* v;
  int64_t k_s0, k_s1, k_s2, v_s0, v_s1, v_s2;
  const int32_t* seqlens;
  const int32_t* block_table;  // nullptr: contiguous
  int64_t bt_s0, bt_s1, page_size;
  const float* alibi;  // (B, H) or nullptr
  int64_t B, H, Hkv, Nq, D, window_left, window_right, n_appended, splits;
  float scale;
  void* out;
  float* lse;
  float* part_out;  // (B * Hkv, splits, R, D)
  float* part_lse;  // (B * Hkv, splits, R)
};

template <typename T, int DPL>
__global__ void __launch_bounds__(kWarps * 32) decode_split_kernel(const DecodeParams p) {
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / p.Hkv, hk = bh % p.Hkv;
  const int64_t split = blockIdx.y;
  const int64_t G = p.H / p.Hkv, R = G * p.Nq;
  const int64_t r0 = int64_t(blockIdx.z) * kRows;
  const int rn = int(imin(kRows, R - r0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t L = int64_t(p.seqlens[b]) + p.n_appended;
  const int64_t lo = p.window_left >= 0 ? imax(0, L - p.Nq - p.window_left) : 0;
  const int64_t span = imax(L - lo, 0);
  const int64_t chunk = (span + p.splits - 1) / p.splits;
  const int64_t s0 = imin(L, lo + split * chunk), s1 = imin(L, s0 + chunk);
  const int64_t d0 = int64_t(lane) * DPL;

  // this lane's slice of the query rows, scaled
  float q[kRows][DPL];
  int pos[kRows];  // positions fit in int32 (cache lengths < 2^31)
  float slope[kRows];
  const T* qp = static_cast<const T*>(p.q);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = r0 + (r < rn ? r : rn - 1);
    const int64_t h = hk * G + row / p.Nq, i = row % p.Nq;
    pos[r] = int(L - p.Nq + i);
    slope[r] = p.alibi ? p.alibi[b * p.H + h] : 0.f;
#pragma unroll
    for (int e = 0; e < DPL; ++e) {
      const int64_t d = d0 + e;
      q[r][e] = (r < rn && d < p.D) ? to_f(qp[b * p.q_sb + h * p.q_sh + i * p.q_sn + d]) * p.scale : 0.f;
    }
  }
  float m[kRows], l[kRows], acc[kRows][DPL];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -CUDART_INF_F;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < DPL; ++e) acc[r][e] = 0.f;
  }
  const T* kb = static_cast<const T*>(p.k);
  const T* vb = static_cast<const T*>(p.v);
  for (int64_t j = s0 + warp; j < s1; j += kWarps) {
    const T* kr;
    const T* vr;
    if (p.block_table != nullptr) {
      const int64_t page = p.block_table[b * p.bt_s0 + (j / p.page_size) * p.bt_s1];
      const int64_t slot = j % p.page_size;
      kr = kb + page * p.k_s0 + hk * p.k_s1 + slot * p.k_s2;
      vr = vb + page * p.v_s0 + hk * p.v_s1 + slot * p.v_s2;
    } else {
      kr = kb + b * p.k_s0 + hk * p.k_s1 + j * p.k_s2;
      vr = vb + b * p.v_s0 + hk * p.v_s1 + j * p.v_s2;
    }
    float kv[DPL], vv[DPL];
#pragma unroll
    for (int e = 0; e < DPL; ++e) {
      const bool ok = d0 + e < p.D;
      kv[e] = ok ? to_f(kr[d0 + e]) : 0.f;
      vv[e] = ok ? to_f(vr[d0 + e]) : 0.f;
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= rn) break;
      float s = 0.f;
#pragma unroll
      for (int e = 0; e < DPL; ++e) s = fmaf(q[r][e], kv[e], s);
      s = warp_sum(s);
      const int jj = int(j);
      if (p.alibi) s -= slope[r] * float(abs(pos[r] - jj));
      const bool visible = (p.window_left < 0 || jj >= pos[r] - int(p.window_left)) &&
                           (p.window_right < 0 || jj <= pos[r] + int(p.window_right));
      if (!visible) continue;
      const float mnew = fmaxf(m[r], s);
      const float alpha = __expf(m[r] - mnew);  // 0 when m was -inf
      const float pj = __expf(s - mnew);
      l[r] = l[r] * alpha + pj;
#pragma unroll
      for (int e = 0; e < DPL; ++e) acc[r][e] = fmaf(pj, vv[e], acc[r][e] * alpha);
      m[r] = mnew;
    }
  }

  // merge the warps: (m, l) through shared memory, then the rescaled accumulators
  __shared__ float sm_m[kWarps][kRows], sm_l[kWarps][kRows];
  __shared__ float sm_acc[kRows][DPL * 32];
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      sm_m[warp][r] = m[r];
      sm_l[warp][r] = l[r];
    }
  }
  for (int i = threadIdx.x; i < kRows * DPL * 32; i += blockDim.x) (&sm_acc[0][0])[i] = 0.f;
  __syncthreads();
  __shared__ float sm_M[kRows], sm_L[kRows];
  if (threadIdx.x < kRows) {  // merged max and sum of row threadIdx.x
    const int r = threadIdx.x;
    float M = -CUDART_INF_F, Ls = 0.f;
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sm_m[w][r]);
    for (int w = 0; w < kWarps; ++w)
      if (sm_m[w][r] != -CUDART_INF_F) Ls += sm_l[w][r] * __expf(sm_m[w][r] - M);
    sm_M[r] = M;
    sm_L[r] = Ls;
  }
  __syncthreads();
  for (int w = 0; w < kWarps; ++w) {
    if (w == warp) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float f = m[r] == -CUDART_INF_F ? 0.f : __expf(m[r] - sm_M[r]);
#pragma unroll
        for (int e = 0; e < DPL; ++e) sm_acc[r][d0 + e] += acc[r][e] * f;
      }
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < rn * p.D; i += blockDim.x) {
    const int r = i / int(p.D);
    const int64_t d = i % p.D, row = r0 + r;
    const float lr = sm_L[r], mr = sm_M[r];
    const bool has = lr > 0.f;
    const float o = has ? sm_acc[r][d] / lr : 0.f;
    const float lse = has ? mr + logf(lr) : -CUDART_INF_F;
    if (p.splits == 1) {
      const int64_t h = hk * G + row / p.Nq, qi = row % p.Nq;
      const int64_t orow = (b * p.H + h) * p.Nq + qi;
      static_cast<T*>(p.out)[orow * p.D + d] = from_f<T>(o);
      if (d == 0) p.lse[orow] = lse;
    } else {
      const int64_t item = bh * p.splits + split;
      p.part_out[(item * R + row) * p.D + d] = o;
      if (d == 0) p.part_lse[item * R + row] = lse;
    }
  }
}

// One block per (b, kv head, row): out = sum_s w_s o_s / sum_s w_s with w_s = exp(lse_s - max).
template <typename T>
__global__ void decode_combine_kernel(const DecodeParams p) {
  const int64_t G = p.H / p.Hkv, R = G * p.Nq;
  const int64_t t = blockIdx.x;
  const int64_t r = t % R, bh = t / R;
  const int64_t b = bh / p.Hkv, hk = bh % p.Hkv;
  float M = -CUDART_INF_F;
  for (int64_t s = 0; s < p.splits; ++s) M = fmaxf(M, p.part_lse[(bh * p.splits + s) * R + r]);
  float den = 0.f;
  for (int64_t s = 0; s < p.splits; ++s) {
    const float ls = p.part_lse[(bh * p.splits + s) * R + r];
    if (ls != -CUDART_INF_F) den += __expf(ls - M);
  }
  const int64_t h = hk * G + r / p.Nq, qi = r % p.Nq;
  const int64_t orow = (b * p.H + h) * p.Nq + qi;
  for (int64_t d = threadIdx.x; d < p.D; d += blockDim.x) {
    float o = 0.f;
    for (int64_t s = 0; s < p.splits; ++s) {
      const float ls = p.part_lse[(bh * p.splits + s) * R + r];
      if (ls != -CUDART_INF_F) o += __expf(ls - M) * p.part_out[((bh * p.splits + s) * R + r) * p.D + d];
    }
    static_cast<T*>(p.out)[orow * p.D + d] = from_f<T>(den > 0.f ? o / den : 0.f);
  }
  if (threadIdx.x == 0) p.lse[orow] = den > 0.f ? M + logf(den) : -CUDART_INF_F;
}

struct AppendParams {
  void* cache;
  int64_t c_s0, c_s1, c_s2;
  const void* src;
  int64_t s_s0, s_s1, s_s2, s_s3;
  const int32_t* seqlens;
  const int32_t* block_table;
  int64_t bt_s0, bt_s1, page_size;
  int64_t Hkv, N, D;
};

// One block per (b, kv head, new token): cache row cache_seqlens[b] + t = src[b, h, t].
template <typename T>
__global__ void decode_append_kernel(const AppendParams a) {
  const int64_t t = blockIdx.x;
  const int64_t i = t % a.N, h = (t / a.N) % a.Hkv, b = t / (a.N * a.Hkv);
  const int64_t pos = int64_t(a.seqlens[b]) + i;
  int64_t row;
  if (a.block_table != nullptr) {
    const int64_t page = a.block_table[b * a.bt_s0 + (pos / a.page_size) * a.bt_s1];
    row = page * a.c_s0 + h * a.c_s1 + (pos % a.page_size) * a.c_s2;
  } else {
    row = b * a.c_s0 + h * a.c_s1 + pos * a.c_s2;
  }
  const T* src = static_cast<const T*>(a.src) + b * a.s_s0 + h * a.s_s1 + i * a.s_s2;
  T* dst = static_cast<T*>(a.cache) + row;
  for (int64_t d = threadIdx.x; d < a.D; d += blockDim.x) dst[d] = src[d * a.s_s3];
}

template <typename T, int DPL>
cudaError_t launch_split(const DecodeParams& p, cudaStream_t stream) {
  const int64_t R = (p.H / p.Hkv) * p.Nq;
  const dim3 grid(unsigned(p.B * p.Hkv), unsigned(p.splits), unsigned((R + kRows - 1) / kRows));
  decode_split_kernel<T, DPL><<<grid, kWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  cudaError_t err;
  if (p.D <= 32) err = launch_split<T, 1>(p, stream);
  else if (p.D <= 64) err = launch_split<T, 2>(p, stream);
  else if (p.D <= 128) err = launch_split<T, 4>(p, stream);
  else err = launch_split<T, 8>(p, stream);
  if (err != cudaSuccess || p.splits == 1) return err;
  const int64_t R = (p.H / p.Hkv) * p.Nq;
  decode_combine_kernel<T><<<unsigned(p.B * p.Hkv * R), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t pyattn_cuda_decode_fwd(int dtype, const void* q, const int64_t* q_st, const void* k,
                                              const int64_t* k_st, const void* v, const int64_t* v_st,
                                              const int32_t* seqlens, const int32_t* block_table, int64_t bt_s0,
                                              int64_t bt_s1, int64_t page_size, const float* alibi, int64_t B,
                                              int64_t H, int64_t Hkv, int64_t Nq, int64_t D, float scale,
                                              int64_t window_left, int64_t window_right, int64_t n_appended,
                                              int64_t splits, void* out, float* lse, float* part_out,
                                              float* part_lse, cudaStream_t stream) {
  if (B == 0 || H == 0 || Nq == 0 || D == 0) return cudaSuccess;
  if (D > 256 || Hkv <= 0 || H % Hkv != 0 || splits < 1) return cudaErrorInvalidValue;
  DecodeParams p{};
  p.q = q;
  p.q_sb = q_st[0]; p.q_sh = q_st[1]; p.q_sn = q_st[2];
  p.k = k; p.v = v;
  p.k_s0 = k_st[0]; p.k_s1 = k_st[1]; p.k_s2 = k_st[2];
  p.v_s0 = v_st[0]; p.v_s1 = v_st[1]; p.v_s2 = v_st[2];
  p.seqlens = seqlens;
  p.block_table = block_table;
  p.bt_s0 = bt_s0; p.bt_s1 = bt_s1; p.page_size = page_size;
  p.alibi = alibi;
  p.B = B; p.H = H; p.Hkv = Hkv; p.Nq = Nq; p.D = D;
  p.window_left = window_left; p.window_right = window_right; p.n_appended = n_appended; p.splits = splits;
  p.scale = scale;
  p.out = out; p.lse = lse; p.part_out = part_out; p.part_lse = part_lse;
  switch (dtype) {
    case 0: return launch_decode<float>(p, stream);
    case 1: return launch_decode<__half>(p, stream);
    case 2: return launch_decode<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t pyattn_cuda_decode_append(int dtype, void* cache, const int64_t* c_st, const void* src,
                                                 const int64_t* s_st, const int32_t* seqlens,
                                                 const int32_t* block_table, int64_t bt_s0, int64_t bt_s1,
                                                 int64_t page_size, int64_t B, int64_t Hkv, int64_t N, int64_t D,
                                                 cudaStream_t stream) {
  if (B == 0 || Hkv == 0 || N == 0 || D == 0) return cudaSuccess;
  AppendParams a{};
  a.cache = cache;
  a.c_s0 = c_st[0]; a.c_s1 = c_st[1]; a.c_s2 = c_st[2];
  a.src = src;
  a.s_s0 = s_st[0]; a.s_s1 = s_st[1]; a.s_s2 = s_st[2]; a.s_s3 = s_st[3];
  a.seqlens = seqlens;
  a.block_table = block_table;
  a.bt_s0 = bt_s0; a.bt_s1 = bt_s1; a.page_size = page_size;
  a.Hkv = Hkv; a.N = N; a.D = D;
  const unsigned blocks = unsigned(B * Hkv * N);
  switch (dtype) {
    case 0: decode_append_kernel<float><<<blocks, 128, 0, stream>>>(a); break;
    case 1: decode_append_kernel<__half><<<blocks, 128, 0, stream>>>(a); break;
    case 2: decode_append_kernel<__nv_bfloat16><<<blocks, 128, 0, stream>>>(a); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
