// Rotary embedding of the new tokens' q and k, and the write of k and v into the paged KV cache: the part of the
// decode step between the q/k/v projections and attention. Numerics of models/layers.h rope_tables + apply_rope.
#pragma once

#include <ATen/ATen.h>

#include "kernels/cpu/registry.h"

namespace rlaif::kernels {

// For each token s (S of them):
//   angle_i = float(positions[s]) * inv_freq[i % (hd/2)]        (float32)
//   cos_i, sin_i = to_dtype(cos(angle_i)), to_dtype(sin(angle_i))
//   x'_i = to_dtype(to_dtype(x_i * cos_i) + to_dtype(rot_i * sin_i)),  rot = [-x[hd/2:], x[:hd/2]]  (NeoX halves)
// q [S, H, hd] is rotated in place; rotated k [S, KV, hd] goes to k_cache[slots[s]] and v to v_cache[slots[s]]
// (k itself is left unchanged). A negative slot skips the cache write of that token (padding rows of a fixed-shape
// batch). q/k/v may have any row stride (views into a fused qkv projection) but contiguous [heads, hd] rows.
// positions/slots int32 or int64 [S]; inv_freq float32 [hd/2]; caches [num_slots, KV, hd] contiguous; q/k/v and
// caches share one dtype (float32/bfloat16) and device.
void rope_kv_write(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                   const at::Tensor& inv_freq, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& slots);
// The argument checks of rope_kv_write (shared with the fused attention op of kernels/cpu/paged_attention.h).
void check_rope_kv_write_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& positions, const at::Tensor& inv_freq, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& slots);
void rope_kv_write_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                       const at::Tensor& inv_freq, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& slots);

}  // namespace rlaif::kernels
