// CUDA paged decode attention (kernels/cpu/paged_attention.h has the spec); reached through the registry.
#pragma once

#include <ATen/ATen.h>

#include "kernels/cpu/paged_attention.h"

namespace rlaif::kernels {

void paged_attention_decode_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                                 int64_t max_context, double scale, const at::Tensor& out);
void paged_attention_decode_rope_cuda(const at::Tensor& q, const RopeKvInputs& rope, const at::Tensor& k_cache,
                                      const at::Tensor& v_cache, const at::Tensor& block_tables,
                                      const at::Tensor& context_lens, int64_t block_size, int64_t max_context,
                                      double scale, const at::Tensor& out);

}  // namespace rlaif::kernels
