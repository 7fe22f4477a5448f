// CUDA LoRA shrink/expand (kernels/cpu/lora.h has the spec); reached through the registry.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace rlaif::kernels {

void lora_shrink_cuda(const at::Tensor& x, const std::vector<at::Tensor>& a, const at::Tensor& t);
void lora_expand_cuda(const at::Tensor& t, const std::vector<at::Tensor>& b, const std::vector<double>& scales,
                      const std::vector<at::Tensor>& ys, const at::Tensor& residual, const std::vector<at::Tensor>& outs);
void lora_expand_silu_mul_cuda(const at::Tensor& t, const std::vector<at::Tensor>& b, const std::vector<double>& scales,
                               const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out);
void lora_expand_rms_norm_cuda(const at::Tensor& t, const at::Tensor& b, double scale, const at::Tensor& y,
                               const at::Tensor& h, const at::Tensor& w, double eps, const at::Tensor& out);

}  // namespace rlaif::kernels
