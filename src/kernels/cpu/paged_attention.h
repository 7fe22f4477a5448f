// Decode attention over a paged KV cache: one query token per sequence against its cached context, read through
// a block table. Numerics of models/layers.h attention (the training forward's), roundings included.
#pragma once

#include <ATen/ATen.h>

#include "kernels/cpu/registry.h"

namespace rlaif::kernels {

// For sequence s, query head h (KV head g = h / (H / KV), as repeat_interleave), n = context_lens[s]:
//   row(t)   = block_tables[s, t / block_size] * block_size + t % block_size          (t < n)
//   score_t  = float(to_dtype(float(to_dtype(sum_d q[s,h,d] * k_cache[row(t), g, d])) * float(scale)))
//              (float32 accumulation; the two roundings are the eager bf16 matmul's and `* scale`'s)
//   p_t      = to_dtype(exp(score_t - max) * (1 / sum_t exp(score_t - max)))           (softmax in float32)
//   out[s,h] = to_dtype(sum_t float(p_t) * v_cache[row(t), g, :])                      (float32 accumulation)
// and out[s] = 0 where n <= 0 (padding rows). The CUDA kernels split the context into partitions and combine them
// with the online-softmax rescaling. The SIMT kernel keeps p in float32 (exp(score − m_partition), never rounded
// to the dtype): in float32 it equals the above up to summation order; in bfloat16 it is the more precise of the
// two. The tensor-core kernel (bfloat16, kernels/cpu/registry.h AttentionKernel) rounds exp(score − m_partition)
// to bfloat16 before P·V and divides by the float32 sum after it: a rounding of the same size as the spec's, at
// another place (as flash attention in the training forward does). Requires n <= max_blocks * block_size and n <= max_context, the
// bound the CUDA grid is sized for (it reads no more than max_context tokens, so a captured CUDA graph stays
// valid while the lengths change below it; the CUDA side cannot check n without a sync). The CUDA kernel meets its
// partitions through one per-device buffer of arrival counters that every launch leaves at zero: launches on one
// device must not run concurrently on two streams (the engine's decode step runs them in order on one).
// q [S, H, hd] (any row stride, contiguous [H, hd] rows); caches [num_blocks * block_size, KV, hd] contiguous;
// block_tables int32 [S, max_blocks] (row stride free); context_lens int32 [S]; out [S, H, hd] contiguous.
void paged_attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                            int64_t max_context, double scale, const at::Tensor& out);
at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                                  int64_t max_context, double scale);
// The decode step's rotary embedding and KV-cache write fused into attention: the result of
//   rope_kv_write(q', rope.k, rope.v, rope.positions, rope.inv_freq, k_cache, v_cache, rope.slots) on a copy q' of q,
//   then paged_attention_decode(q', ...)
// (kernels/cpu/rope_kv_write.h). q is not modified. Requires every non-negative slots[s] to be the cache row of
// token context_lens[s] − 1 of sequence s (the token being decoded), which is the only row the fused kernel lets
// the writing block see before the others read; padding rows have slot < 0 and context_lens 0.
struct RopeKvInputs {
  at::Tensor k, v;       // [S, KV, hd], any row stride
  at::Tensor positions;  // int32/int64 [S]
  at::Tensor inv_freq;   // float32 [hd / 2]
  at::Tensor slots;      // int32/int64 [S]
};
void paged_attention_decode_rope(const at::Tensor& q, const RopeKvInputs& rope, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& context_lens, int64_t block_size, int64_t max_context, double scale,
                                 const at::Tensor& out);
void paged_attention_decode_rope_cpu(const at::Tensor& q, const RopeKvInputs& rope, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache, const at::Tensor& block_tables,
                                     const at::Tensor& context_lens, int64_t block_size, int64_t max_context,
                                     double scale, const at::Tensor& out);
void paged_attention_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                                int64_t max_context, double scale, const at::Tensor& out);

}  // namespace rlaif::kernels
