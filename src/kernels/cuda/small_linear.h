// CUDA few-row projections (kernels/cpu/small_linear.h has the spec); reached through the registry.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "kernels/cpu/small_linear.h"

namespace rlaif::kernels {

void small_linear_cuda(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                       const std::vector<at::Tensor>& biases, const at::Tensor& residual,
                       const std::vector<at::Tensor>& outs, const InputNorm& norm);
void small_linear_silu_mul_cuda(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                                const at::Tensor& out, const InputNorm& norm);

}  // namespace rlaif::kernels
