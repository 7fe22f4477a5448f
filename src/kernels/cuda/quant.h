// CUDA MLX affine quantization (kernels/cpu/quant.h has the spec); reached through the registry.
#pragma once

#include <ATen/ATen.h>

namespace rlaif::kernels {

void quantize_affine_cuda(const at::Tensor& w, int64_t bits, int64_t group_size, const at::Tensor& wq,
                          const at::Tensor& scales, const at::Tensor& biases);
void dequantize_affine_cuda(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases, int64_t bits,
                            int64_t group_size, const at::Tensor& out);
void quant_linear_cuda(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                       int64_t bits, int64_t group_size, const at::Tensor& out);
void quant_linear_mma_cuda(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                           int64_t bits, int64_t group_size, const at::Tensor& out);

}  // namespace rlaif::kernels
