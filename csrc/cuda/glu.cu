// Gated linear unit on the GPU (plain CUDA, no torch headers):
//   out = act(gate) * up                                    (fp32 math, stored in gate's dtype)
//   dgate = dout * up * act'(gate),  dup = dout * act(gate)
// gate/up: (T, I) with unit column stride and any row stride (usually the two halves of a
// (T, 2I) tensor); out/dgate/dup are contiguous (T, I).
// activation codes: 0 silu, 1 gelu (exact erf), 2 gelu_tanh, 3 relu, 4 sigmoid.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace pyattn_glu {

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

enum Act { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3, kSigmoid = 4 };

__device__ __forceinline__ float sigmoid_f(float g) { return 1.f / (1.f + expf(-g)); }

template <int A>
__device__ __forceinline__ float act_f(float g) {
  if constexpr (A == kSilu) {
    return g * sigmoid_f(g);
  } else if constexpr (A == kGelu) {
    return 0.5f * g * (1.f + erff(g * 0.70710678118654752f));
  } else if constexpr (A == kGeluTanh) {
    const float inner = 0.79788456080286536f * (g + 0.044715f * g * g * g);
    return 0.5f * g * (1.f + tanhf(inner));
  } else if constexpr (A == kRelu) {
    return g > 0.f ? g : 0.f;
  } else {
    return sigmoid_f(g);
  }
}

// Returns act(g) and writes act'(g) to d.
template <int A>
__device__ __forceinline__ float act_grad_f(float g, float& d) {
  if constexpr (A == kSilu) {
    const float s = sigmoid_f(g);
    d = s * (1.f + g * (1.f - s));
    return g * s;
  } else if constexpr (A == kGelu) {
    const float cdf = 0.5f * (1.f + erff(g * 0.70710678118654752f));
    const float pdf = 0.39894228040143268f * expf(-0.5f * g * g);
    d = cdf + g * pdf;
    return g * cdf;
  } else if constexpr (A == kGeluTanh) {
    const float k0 = 0.79788456080286536f, k1 = 0.044715f;
    const float t = tanhf(k0 * (g + k1 * g * g * g));
    d = 0.5f * (1.f + t) + 0.5f * g * (1.f - t * t) * k0 * (1.f + 3.f * k1 * g * g);
    return 0.5f * g * (1.f + t);
  } else if constexpr (A == kRelu) {
    d = g > 0.f ? 1.f : 0.f;
    return g > 0.f ? g : 0.f;
  } else {
    const float s = sigmoid_f(g);
    d = s * (1.f - s);
    return s;
  }
}

// Grid: (column blocks, row blocks); each thread walks rows with a stride so any T fits.
template <typename T, int A>
__global__ void __launch_bounds__(256) glu_fwd_kernel(const T* __restrict__ gate, int64_t sg,
                                                       const T* __restrict__ up, int64_t su, T* __restrict__ out,
                                                       int64_t rows, int64_t I) {
  const int64_t col = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= I) return;
  for (int64_t t = blockIdx.y; t < rows; t += gridDim.y) {
    const float g = to_f<T>(gate[t * sg + col]);
    const float u = to_f<T>(up[t * su + col]);
    out[t * I + col] = from_f<T>(act_f<A>(g) * u);
  }
}

template <typename T, int A>
__global__ void __launch_bounds__(256) glu_bwd_kernel(const T* __restrict__ dout, int64_t sd,
                                                       const T* __restrict__ gate, int64_t sg,
                                                       const T* __restrict__ up, int64_t su, T* __restrict__ dgate,
                                                       T* __restrict__ dup, int64_t rows, int64_t I) {
  const int64_t col = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= I) return;
  for (int64_t t = blockIdx.y; t < rows; t += gridDim.y) {
    const float go = to_f<T>(dout[t * sd + col]);
    const float g = to_f<T>(gate[t * sg + col]);
    const float u = to_f<T>(up[t * su + col]);
    float d;
    const float a = act_grad_f<A>(g, d);
    dgate[t * I + col] = from_f<T>(go * u * d);
    dup[t * I + col] = from_f<T>(go * a);
  }
}

inline void grid_for(int64_t rows, int64_t I, dim3& grid, int& threads) {
  threads = I >= 256 ? 256 : (int)(((I + 31) / 32) * 32);
  const int64_t cb = (I + threads - 1) / threads;
  // enough CTAs to fill the GPU; rows beyond gridDim.y are strided
  int64_t rb = rows < 65535 ? rows : 65535;
  const int64_t target = 8192;
  if (cb * rb > target) {
    rb = target / cb;
    if (rb < 1) rb = 1;
  }
  grid = dim3((unsigned)cb, (unsigned)rb, 1);
}

template <typename T>
cudaError_t fwd_launch(int act, const void* gate, int64_t sg, const void* up, int64_t su, void* out, int64_t rows,
                       int64_t I, cudaStream_t stream) {
  dim3 grid;
  int nt;
  grid_for(rows, I, grid, nt);
  const T* g = static_cast<const T*>(gate);
  const T* u = static_cast<const T*>(up);
  T* o = static_cast<T*>(out);
  switch (act) {
    case kSilu: glu_fwd_kernel<T, kSilu><<<grid, nt, 0, stream>>>(g, sg, u, su, o, rows, I); break;
    case kGelu: glu_fwd_kernel<T, kGelu><<<grid, nt, 0, stream>>>(g, sg, u, su, o, rows, I); break;
    case kGeluTanh: glu_fwd_kernel<T, kGeluTanh><<<grid, nt, 0, stream>>>(g, sg, u, su, o, rows, I); break;
    case kRelu: glu_fwd_kernel<T, kRelu><<<grid, nt, 0, stream>>>(g, sg, u, su, o, rows, I); break;
    case kSigmoid: glu_fwd_kernel<T, kSigmoid><<<grid, nt, 0, stream>>>(g, sg, u, su, o, rows, I); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_launch(int act, const void* dout, int64_t sd, const void* gate, int64_t sg, const void* up,
                       int64_t su, void* dgate, void* dup, int64_t rows, int64_t I, cudaStream_t stream) {
  dim3 grid;
  int nt;
  grid_for(rows, I, grid, nt);
  const T* d = static_cast<const T*>(dout);
  const T* g = static_cast<const T*>(gate);
  const T* u = static_cast<const T*>(up);
  T* dg = static_cast<T*>(dgate);
  T* du = static_cast<T*>(dup);
  switch (act) {
    case kSilu: glu_bwd_kernel<T, kSilu><<<grid, nt, 0, stream>>>(d, sd, g, sg, u, su, dg, du, rows, I); break;
    case kGelu: glu_bwd_kernel<T, kGelu><<<grid, nt, 0, stream>>>(d, sd, g, sg, u, su, dg, du, rows, I); break;
    case kGeluTanh: glu_bwd_kernel<T, kGeluTanh><<<grid, nt, 0, stream>>>(d, sd, g, sg, u, su, dg, du, rows, I); break;
    case kRelu: glu_bwd_kernel<T, kRelu><<<grid, nt, 0, stream>>>(d, sd, g, sg, u, su, dg, du, rows, I); break;
    case kSigmoid: glu_bwd_kernel<T, kSigmoid><<<grid, nt, 0, stream>>>(d, sd, g, sg, u, su, dg, du, rows, I); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace pyattn_glu

extern "C" {

// dtype: 0 fp32, 1 fp16, 2 bf16. gate/up row strides sg/su (elements), out contiguous (rows, I).
cudaError_t pyattn_cuda_glu_fwd(int dtype, int activation, const void* gate, int64_t sg, const void* up, int64_t su,
                                void* out, int64_t rows, int64_t I, cudaStream_t stream) {
  if (activation < 0 || activation > 4) return cudaErrorInvalidValue;
  if (rows <= 0 || I <= 0) return cudaSuccess;
  switch (dtype) {
    case 0: return pyattn_glu::fwd_launch<float>(activation, gate, sg, up, su, out, rows, I, stream);
    case 1: return pyattn_glu::fwd_launch<__half>(activation, gate, sg, up, su, out, rows, I, stream);
    case 2: return pyattn_glu::fwd_launch<__nv_bfloat16>(activation, gate, sg, up, su, out, rows, I, stream);
    default: return cudaErrorInvalidValue;
  }
}

// dout row stride sd; dgate/dup contiguous (rows, I).
cudaError_t pyattn_cuda_glu_bwd(int dtype, int activation, const void* dout, int64_t sd, const void* gate, int64_t sg,
                                const void* up, int64_t su, void* dgate, void* dup, int64_t rows, int64_t I,
                                cudaStream_t stream) {
  if (activation < 0 || activation > 4) return cudaErrorInvalidValue;
  if (rows <= 0 || I <= 0) return cudaSuccess;
  switch (dtype) {
    case 0: return pyattn_glu::bwd_launch<float>(activation, dout, sd, gate, sg, up, su, dgate, dup, rows, I, stream);
    case 1: return pyattn_glu::bwd_launch<__half>(activation, dout, sd, gate, sg, up, su, dgate, dup, rows, I, stream);
    case 2:
      return pyattn_glu::bwd_launch<__nv_bfloat16>(activation, dout, sd, gate, sg, up, su, dgate, dup, rows, I,
                                                   stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // extern "C"
