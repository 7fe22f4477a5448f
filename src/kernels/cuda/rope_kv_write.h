// CUDA RoPE + paged KV-cache write (kernels/cpu/rope_kv_write.h has the spec); reached through the registry.
#pragma once

#include <ATen/ATen.h>

namespace rlaif::kernels {

void rope_kv_write_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                        const at::Tensor& inv_freq, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& slots);

}  // namespace rlaif::kernels
