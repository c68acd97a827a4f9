// RMSNorm on the GPU (plain CUDA, no torch headers).
//
//   forward : h = x (+ residual, rounded to x's dtype); rstd = 1/sqrt(mean(h^2) + eps);
//             y = h * rstd (* w)                                 (statistics and math in fp32)
//   backward: xhat = x * rstd; g = dy (* w); dx = rstd * (g - xhat * mean(xhat * g)) (+ dh);
//             dw = sum_rows dy * xhat   (per-chunk partial sums, then a fixed-order second pass:
//             deterministic, no float atomics)
//
// One CTA per row (forward) / per chunk of rows (backward). Each thread keeps up to kCache
// values of its row in registers; rows longer than blockDim * kCache are handled by a second
// loop that re-reads global memory (L1/L2 resident), so any N works.
// The weight is always passed as fp32 (the binding converts a half/bf16 weight once).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace pyattn_rms {

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

constexpr int kCache = 8;        // values per thread kept in registers
constexpr int kMaxThreads = 1024;

// Sum over the CTA (blockDim.x a multiple of 32, <= 1024). Fixed reduction order: deterministic.
__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nwarps ? red[lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
  return t;  // every thread holds the total
}

template <typename T, bool kRes, bool kW>
__global__ void __launch_bounds__(kMaxThreads) rms_fwd_kernel(const T* __restrict__ x, int64_t sx,
                                                               const T* __restrict__ res, int64_t sr,
                                                               const float* __restrict__ w, T* __restrict__ y,
                                                               T* __restrict__ h, float* __restrict__ rstd,
                                                               int64_t N, float eps) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const int nt = blockDim.x;
  const T* xr = x + row * sx;
  const T* rr = kRes ? res + row * sr : nullptr;
  T* hr = kRes ? h + row * N : nullptr;
  T* yr = y + row * N;

  float cache[kCache];
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < kCache; ++k) {
    const int64_t n = threadIdx.x + (int64_t)k * nt;
    float v = 0.f;
    if (n < N) {
      if constexpr (kRes) {
        const T hv = from_f<T>(to_f<T>(xr[n]) + to_f<T>(rr[n]));  // h rounded to the input dtype
        hr[n] = hv;
        v = to_f<T>(hv);
      } else {
        v = to_f<T>(xr[n]);
      }
    }
    cache[k] = v;
    ss += v * v;
  }
  for (int64_t n = threadIdx.x + (int64_t)kCache * nt; n < N; n += nt) {
    float v;
    if constexpr (kRes) {
      const T hv = from_f<T>(to_f<T>(xr[n]) + to_f<T>(rr[n]));
      hr[n] = hv;
      v = to_f<T>(hv);
    } else {
      v = to_f<T>(xr[n]);
    }
    ss += v * v;
  }
  ss = block_sum(ss, red);
  const float r = rsqrtf(ss / (float)N + eps);
  if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
  for (int k = 0; k < kCache; ++k) {
    const int64_t n = threadIdx.x + (int64_t)k * nt;
    if (n < N) {
      float o = cache[k] * r;
      if constexpr (kW) o *= w[n];
      yr[n] = from_f<T>(o);
    }
  }
  for (int64_t n = threadIdx.x + (int64_t)kCache * nt; n < N; n += nt) {
    // re-read: the thread's own h write (same thread, program order) or x
    const float v = kRes ? to_f<T>(hr[n]) : to_f<T>(xr[n]);
    float o = v * r;
    if constexpr (kW) o *= w[n];
    yr[n] = from_f<T>(o);
  }
}

// One CTA per chunk of rows; dw_part[chunk][n] holds the chunk's partial weight gradient.
template <typename T, bool kW, bool kDh>
__global__ void __launch_bounds__(kMaxThreads) rms_bwd_kernel(const T* __restrict__ dy, int64_t sdy,
                                                               const T* __restrict__ x, int64_t sx,
                                                               const float* __restrict__ w,
                                                               const float* __restrict__ rstd,
                                                               const T* __restrict__ dh, int64_t sdh,
                                                               T* __restrict__ dx, float* __restrict__ dw_part,
                                                               int64_t M, int64_t N, int64_t rows_per_chunk) {
  __shared__ float red[32];
  const int nt = blockDim.x;
  const int64_t chunk = blockIdx.x;
  const int64_t r0 = chunk * rows_per_chunk;
  const int64_t r1 = min(M, r0 + rows_per_chunk);
  float* dwp = kW ? dw_part + chunk * N : nullptr;

  float dwc[kCache];
#pragma unroll
  for (int k = 0; k < kCache; ++k) dwc[k] = 0.f;
  if constexpr (kW) {
    for (int64_t n = threadIdx.x + (int64_t)kCache * nt; n < N; n += nt) dwp[n] = 0.f;
  }

  for (int64_t row = r0; row < r1; ++row) {
    const float r = rstd[row];
    const T* xr = x + row * sx;
    const T* gr = dy + row * sdy;
    float xh[kCache], g[kCache];
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      const int64_t n = threadIdx.x + (int64_t)k * nt;
      float a = 0.f, b = 0.f;
      if (n < N) {
        a = to_f<T>(xr[n]) * r;
        b = to_f<T>(gr[n]);
        if constexpr (kW) {
          dwc[k] += b * a;
          b *= w[n];
        }
      }
      xh[k] = a;
      g[k] = b;
      dot += a * b;
    }
    for (int64_t n = threadIdx.x + (int64_t)kCache * nt; n < N; n += nt) {
      const float a = to_f<T>(xr[n]) * r;
      float b = to_f<T>(gr[n]);
      if constexpr (kW) {
        dwp[n] += b * a;  // this thread owns column n of this chunk: plain RMW, deterministic
        b *= w[n];
      }
      dot += a * b;
    }
    const float c = block_sum(dot, red) / (float)N;
    T* dxr = dx + row * N;
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      const int64_t n = threadIdx.x + (int64_t)k * nt;
      if (n < N) {
        float o = (g[k] - xh[k] * c) * r;
        if constexpr (kDh) o += to_f<T>(dh[row * sdh + n]);
        dxr[n] = from_f<T>(o);
      }
    }
    for (int64_t n = threadIdx.x + (int64_t)kCache * nt; n < N; n += nt) {
      const float a = to_f<T>(xr[n]) * r;
      float b = to_f<T>(gr[n]);
      if constexpr (kW) b *= w[n];
      float o = (b - a * c) * r;
      if constexpr (kDh) o += to_f<T>(dh[row * sdh + n]);
      dxr[n] = from_f<T>(o);
    }
  }
  if constexpr (kW) {
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      const int64_t n = threadIdx.x + (int64_t)k * nt;
      if (n < N) dwp[n] = dwc[k];
    }
  }
}

// dw[n] = sum over chunks in index order (deterministic).
__global__ void rms_dw_reduce_kernel(const float* __restrict__ dw_part, float* __restrict__ dw, int64_t chunks,
                                     int64_t N) {
  const int64_t n = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  float s = 0.f;
  for (int64_t c = 0; c < chunks; ++c) s += dw_part[c * N + n];
  dw[n] = s;
}

inline int threads_for(int64_t N) {
  int64_t t = (N + kCache - 1) / kCache;
  t = ((t + 31) / 32) * 32;
  if (t < 32) t = 32;
  if (t > kMaxThreads) t = kMaxThreads;
  return (int)t;
}

template <typename T>
cudaError_t fwd_launch(const void* x, int64_t sx, const void* res, int64_t sr, const float* w, void* y, void* h,
                       float* rstd, int64_t M, int64_t N, float eps, cudaStream_t stream) {
  const int nt = threads_for(N);
  const dim3 grid((unsigned)M);
  const T* xp = static_cast<const T*>(x);
  const T* rp = static_cast<const T*>(res);
  T* yp = static_cast<T*>(y);
  T* hp = static_cast<T*>(h);
  if (res && w) rms_fwd_kernel<T, true, true><<<grid, nt, 0, stream>>>(xp, sx, rp, sr, w, yp, hp, rstd, N, eps);
  else if (res) rms_fwd_kernel<T, true, false><<<grid, nt, 0, stream>>>(xp, sx, rp, sr, w, yp, hp, rstd, N, eps);
  else if (w) rms_fwd_kernel<T, false, true><<<grid, nt, 0, stream>>>(xp, sx, rp, sr, w, yp, hp, rstd, N, eps);
  else rms_fwd_kernel<T, false, false><<<grid, nt, 0, stream>>>(xp, sx, rp, sr, w, yp, hp, rstd, N, eps);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_launch(const void* dy, int64_t sdy, const void* x, int64_t sx, const float* w, const float* rstd,
                       const void* dh, int64_t sdh, void* dx, float* dw, float* dw_part, int64_t M, int64_t N,
                       int64_t rows_per_chunk, cudaStream_t stream) {
  const int nt = threads_for(N);
  const int64_t chunks = (M + rows_per_chunk - 1) / rows_per_chunk;
  const dim3 grid((unsigned)chunks);
  const T* dyp = static_cast<const T*>(dy);
  const T* xp = static_cast<const T*>(x);
  const T* dhp = static_cast<const T*>(dh);
  T* dxp = static_cast<T*>(dx);
#define PYATTN_RMS_BWD(KW, KDH) \
  rms_bwd_kernel<T, KW, KDH><<<grid, nt, 0, stream>>>(dyp, sdy, xp, sx, w, rstd, dhp, sdh, dxp, dw_part, M, N, rows_per_chunk)
  if (w && dh) PYATTN_RMS_BWD(true, true);
  else if (w) PYATTN_RMS_BWD(true, false);
  else if (dh) PYATTN_RMS_BWD(false, true);
  else PYATTN_RMS_BWD(false, false);
#undef PYATTN_RMS_BWD
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !w) return err;
  rms_dw_reduce_kernel<<<(unsigned)((N + 255) / 256), 256, 0, stream>>>(dw_part, dw, chunks, N);
  return cudaGetLastError();
}

}  // namespace pyattn_rms

// dtype codes shared by all pyattn CUDA launchers: 0 = fp32, 1 = fp16, 2 = bf16.
extern "C" {

// Rows per weight-gradient chunk: a function of M only (results do not depend on the device).
int64_t pyattn_cuda_rms_norm_bwd_rows_per_chunk(int64_t M) {
  const int64_t target_chunks = 512;
  int64_t r = (M + target_chunks - 1) / target_chunks;
  return r < 1 ? 1 : r;
}

int64_t pyattn_cuda_rms_norm_bwd_num_chunks(int64_t M) {
  const int64_t r = pyattn_cuda_rms_norm_bwd_rows_per_chunk(M);
  return (M + r - 1) / r;
}

// x: (M, N) row stride sx, unit column stride; residual (nullable) row stride sr; w fp32 (N,) or null;
// y: (M, N) contiguous; h: (M, N) contiguous (only written when residual != null); rstd: (M,) fp32.
cudaError_t pyattn_cuda_rms_norm_fwd(int dtype, const void* x, int64_t sx, const void* residual, int64_t sr,
                                     const float* w, void* y, void* h, float* rstd, int64_t M, int64_t N, float eps,
                                     cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  if (M > 2147483647LL) return cudaErrorInvalidValue;
  switch (dtype) {
    case 0: return pyattn_rms::fwd_launch<float>(x, sx, residual, sr, w, y, h, rstd, M, N, eps, stream);
    case 1: return pyattn_rms::fwd_launch<__half>(x, sx, residual, sr, w, y, h, rstd, M, N, eps, stream);
    case 2: return pyattn_rms::fwd_launch<__nv_bfloat16>(x, sx, residual, sr, w, y, h, rstd, M, N, eps, stream);
    default: return cudaErrorInvalidValue;
  }
}

// dy (row stride sdy), x (row stride sx), dh (nullable, row stride sdh); dx (M, N) contiguous;
// dw (N,) fp32 and dw_part (num_chunks(M), N) fp32 workspace, both only used when w != null.
cudaError_t pyattn_cuda_rms_norm_bwd(int dtype, const void* dy, int64_t sdy, const void* x, int64_t sx,
                                     const float* w, const float* rstd, const void* dh, int64_t sdh, void* dx,
                                     float* dw, float* dw_part, int64_t M, int64_t N, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  if (M <= 0) {
    if (w) return cudaMemsetAsync(dw, 0, sizeof(float) * (size_t)N, stream);
    return cudaSuccess;
  }
  const int64_t rpc = pyattn_cuda_rms_norm_bwd_rows_per_chunk(M);
  switch (dtype) {
    case 0: return pyattn_rms::bwd_launch<float>(dy, sdy, x, sx, w, rstd, dh, sdh, dx, dw, dw_part, M, N, rpc, stream);
    case 1: return pyattn_rms::bwd_launch<__half>(dy, sdy, x, sx, w, rstd, dh, sdh, dx, dw, dw_part, M, N, rpc, stream);
    case 2:
      return pyattn_rms::bwd_launch<__nv_bfloat16>(dy, sdy, x, sx, w, rstd, dh, sdh, dx, dw, dw_part, M, N, rpc,
                                                   stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // extern "C"
