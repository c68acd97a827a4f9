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
// Shared pieces: attn_common.cuh (params, context, scores, dropout, bands), attn_tiles.cuh (tiles,
// block_gemm, shared-memory layouts).
#include "attn_tiles.cuh"

namespace pyattn_attn {

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
