// ATen helper shared by the CPU and CUDA launchers (not torch-free: the
// torch-free kernel code is strategies.h and csrc/cuda/*.cuh).
#pragma once
#include <ATen/ATen.h>

#include <limits>
#include <utility>

namespace fastmine {

// Map two integer vectors (labels, or sample ids) to int32 codes that preserve
// equality within and across them, so kernels compare 32-bit lanes.  Values
// that fit in int32 are cast; otherwise the joint set is ranked with unique().
// Works on any device; costs one min/max (and a sort only for huge values).
inline std::pair<at::Tensor, at::Tensor> compact_int32(const at::Tensor& q, const at::Tensor& r) {
  auto all = at::cat({q.to(at::kLong), r.to(at::kLong)});
  if (all.numel() > 0) {
    const int64_t lo = all.min().item<int64_t>(), hi = all.max().item<int64_t>();
    if (lo < std::numeric_limits<int32_t>::min() || hi > std::numeric_limits<int32_t>::max()) {
      all = std::get<1>(at::_unique2(all, /*sorted=*/false, /*return_inverse=*/true));
    }
  }
  all = all.to(at::kInt);
  return {all.narrow(0, 0, q.numel()).contiguous(),
          all.narrow(0, q.numel(), r.numel()).contiguous()};
}

}  // namespace fastmine
