// CUDA few-row projections with quantized weights (kernels/cpu/quant_small_linear.h has the spec); reached
// through the registry.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "kernels/cpu/quant_small_linear.h"

namespace rlaif::kernels {

void quant_small_linear_cuda(const at::Tensor& x, const std::vector<QuantMatrix>& weights,
                             const std::vector<at::Tensor>& biases, const at::Tensor& residual,
                             const std::vector<at::Tensor>& outs, const InputNorm& norm);
void quant_small_linear_silu_mul_cuda(const at::Tensor& x, const QuantMatrix& gate, const QuantMatrix& up,
                                      const at::Tensor& out, const InputNorm& norm);

}  // namespace rlaif::kernels
