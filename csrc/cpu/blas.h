// The BLAS behind the CPU kernels' fp32 tile products.
//
// ATen's own CPU matmuls call the Fortran `sgemm_` of the BLAS that libtorch_cpu is linked with
// (MKL in the pip wheels, OpenBLAS elsewhere). ATen's C++ wrapper at::native::cpublas::gemm is
// declared in <ATen/native/CPUBlas.h> but not exported by libtorch_cpu (only brgemm / pack /
// brgemm_release are TORCH_API, torch 2.13), so the symbol is looked up in libtorch_cpu itself,
// once. A torch without one makes every call raise with the reason instead of running a naive
// loop 10x slower; blas_vendor() names what was found (reported by pyattn.cpu_tuning()).
#pragma once
#include <ATen/native/CPUBlas.h>
#include <ATen/native/TransposeType.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

namespace pyattn_cpu {

using at::native::TransposeType;

using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);

struct BlasLib {
  SgemmFn sgemm = nullptr;
  std::string vendor;  // "MKL <version>", "OpenBLAS <config>", "BLAS (sgemm_)" or the reason it is missing
};

inline const BlasLib& blas_lib() {
  static const BlasLib lib = [] {
    BlasLib b;
    // the library that holds ATen's brgemm: libtorch_cpu
    Dl_info info{};
    void* handle = nullptr;
    if (dladdr(reinterpret_cast<void*>(&at::native::cpublas::brgemm_release), &info) && info.dli_fname)
      handle = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    void* sym = handle ? dlsym(handle, "sgemm_") : nullptr;
    if (!sym) sym = dlsym(RTLD_DEFAULT, "sgemm_");
    b.sgemm = reinterpret_cast<SgemmFn>(sym);
    if (!b.sgemm) {
      b.vendor = "none: libtorch_cpu exports no BLAS sgemm_ (torch built without MKL/OpenBLAS)";
      return b;
    }
    using MklVersion = void (*)(char*, int);
    using OpenblasConfig = char* (*)();
    if (auto f = reinterpret_cast<MklVersion>(handle ? dlsym(handle, "MKL_Get_Version_String") : nullptr)) {
      char buf[256] = {0};
      f(buf, sizeof(buf) - 1);
      b.vendor = buf;
    } else if (auto g = reinterpret_cast<OpenblasConfig>(dlsym(handle ? handle : RTLD_DEFAULT, "openblas_get_config"))) {
      b.vendor = std::string("OpenBLAS ") + g();
    } else {
      b.vendor = "BLAS (sgemm_)";
    }
    return b;
  }();
  return lib;
}

inline const std::string& blas_vendor() { return blas_lib().vendor; }

// Column-major C (m x n, ldc) = alpha op(A) op(B) + beta C, as BLAS sgemm.
inline void sgemm(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                  int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < m; ++i) c[j * ldc + i] = beta == 0.f ? 0.f : beta * c[j * ldc + i];
    return;
  }
  const SgemmFn f = blas_lib().sgemm;
  TORCH_CHECK(f != nullptr, "pyattn cpu kernels: ", blas_vendor());
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(lda <= kIntMax && ldb <= kIntMax && ldc <= kIntMax && m <= kIntMax && n <= kIntMax && k <= kIntMax,
              "pyattn cpu kernels: BLAS leading dimension over 2^31");
  const char cta = ta != TransposeType::NoTranspose ? 'T' : 'N', ctb = tb != TransposeType::NoTranspose ? 'T' : 'N';
  const int im = int(m), in = int(n), ik = int(k);
  const int ilda = int(std::max<int64_t>(lda, 1)), ildb = int(std::max<int64_t>(ldb, 1)),
            ildc = int(std::max<int64_t>(ldc, 1));
  f(&cta, &ctb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
}

// The same with bool transposes.
inline void sgemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                  const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  sgemm(ta ? TransposeType::Transpose : TransposeType::NoTranspose,
        tb ? TransposeType::Transpose : TransposeType::NoTranspose, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace pyattn_cpu
