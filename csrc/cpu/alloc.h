// Output allocation for the CPU kernels.
//
// Large tensors come straight from mmap, so the kernel that first writes them pays one page
// fault per 4 KiB page; on virtual machines that is the dominant cost of a bandwidth-bound op
// (a fresh 64 MiB output: ~20 ms of faults against ~4 ms of copying). Asking for transparent
// huge pages before the first touch makes it one fault per 2 MiB. The request is a hint: it
// is ignored where THP is disabled, and it never changes what the tensor holds.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pyattn_cpu {

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto nbytes = static_cast<uintptr_t>(t.storage().nbytes());
  if (nbytes < 4 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + nbytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// at::empty, with huge pages requested for large buffers.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}

// at::zeros, with huge pages requested before the zero fill touches the memory.
inline at::Tensor zeros_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return empty_output(sizes, options).zero_();
}

}  // namespace pyattn_cpu
