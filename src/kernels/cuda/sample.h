// CUDA sort-free sampling with top-k/top-p/min-p (kernels/cpu/sample.h has the spec); reached through the registry.
#pragma once

#include <ATen/ATen.h>

namespace rlaif::kernels {

void sample_cuda(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                 const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& uniform,
                 const at::Tensor& tokens, const at::Tensor& logprobs);

}  // namespace rlaif::kernels
