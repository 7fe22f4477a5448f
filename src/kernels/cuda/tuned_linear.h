// CUDA side of kernels/cpu/tuned_linear.h (cuBLASLt, algorithms timed per shape); reached through the registry.
#pragma once

#include <ATen/ATen.h>

namespace rlaif::kernels {

void linear_tuned_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& out,
                       bool accumulate);

}  // namespace rlaif::kernels
