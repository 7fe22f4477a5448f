// CUDA silu(gate) * up (kernels/cpu/silu_mul.h has the spec); reached through the registry.
#pragma once

#include <ATen/ATen.h>

namespace rlaif::kernels {

void silu_mul_cuda(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out);

}  // namespace rlaif::kernels
