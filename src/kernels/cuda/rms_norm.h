// CUDA RMSNorm and residual-add + RMSNorm (kernels/cpu/rms_norm.h has the spec); reached through the registry.
#pragma once

#include <ATen/ATen.h>

namespace rlaif::kernels {

void rms_norm_cuda(const at::Tensor& x, const at::Tensor& w, double eps, const at::Tensor& out);
void add_rms_norm_cuda(const at::Tensor& h, const at::Tensor& delta, const at::Tensor& w, double eps,
                       const at::Tensor& out);

}  // namespace rlaif::kernels
