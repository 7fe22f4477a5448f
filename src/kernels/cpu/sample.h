// Token sampling without a full sort, for the decode step: temperature, top-k, top-p and min-p per row, then one
// inverse-CDF draw. It runs inside the CUDA graph, so a decode step needs no host round trip between the logits
// and the token. Penalties stay in engine/sampler.cpp.
#pragma once

#include <ATen/ATen.h>

#include "kernels/cpu/registry.h"

namespace rlaif::kernels {

// One token per row of logits [S, V] (float32/bfloat16, last dim contiguous, any row stride); every per-row tensor
// is contiguous [S] on the logits' device. The semantics are engine/sampler.cpp's (sample_tokens without penalties):
//
// temperature float32: ≤ 0 is greedy: the argmax (first index on ties), filters ignored, processed = raw.
// Otherwise y_i = float(logit_i) / T (float32 division), e_i = exp(y_i − max y) (float32 exp), and the tokens are
// ranked by (y descending, index ascending). The kept set is a prefix of that ranking of length
// n = min(n_k, n_p, n_m):
//   top_k int32 (≤ 0 or ≥ V: off): n_k = k.
//   top_p float32 (≥ 1: off): with Z_k = Σ e over the first n_k ranks, rank r is kept when r = 0 or when the mass
//     of the ranks before it, Σ_{j<r} e_j, is < p·Z_k (the smallest prefix whose mass reaches p; ≤ 0 keeps one).
//   min_p float32 (≤ 0: off): rank r is kept when e_r ≥ min(min_p, 1) (p_r ≥ min_p · p_max).
// The token is drawn from the kept set by inverse CDF in vocabulary order with uniform float64 in [0, 1): the first
// kept token whose cumulative mass (float64 sum of e) exceeds u·Σ_kept e. logprobs [S, 2] float32: the token's
// log-prob under softmax(logits) (raw) and under the kept set's softmax(y) (processed). tokens [S] int64.
//
// Contract against engine/sampler.cpp: same kept set and same token for the same u, except (a) where a float
// rounding differs at a boundary (the sampler sums float32 softmax probabilities in sorted order; here float64 sums
// of e in another order, so a token whose prefix mass is within ~1e-6 of p·Z_k, whose e is within an ulp of min_p,
// or a u within ~1e-7 of a cumulative boundary may go the other way), (b) ties: here equal y are ranked by index,
// the sampler's at::sort is unstable on the CPU (stable on CUDA), (c) top_p = 1 is off here, while the sampler,
// when it sorts the batch for another row, can drop far-tail tokens whose float32 cumulative sum rounds to 1, and
// (d) min_p > 1 keeps the top token here (the sampler produces NaN). The CPU reference and the CUDA kernel differ
// only by (a).
void sample(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
            const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& uniform, const at::Tensor& tokens,
            const at::Tensor& logprobs);
void sample_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k,
                const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& uniform,
                const at::Tensor& tokens, const at::Tensor& logprobs);

// Temperature only (no filters): the op above with every filter off. top_k/top_p/min_p may also be passed as
// undefined tensors to the op above, which means off for every row.
void sample(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& uniform,
            const at::Tensor& tokens, const at::Tensor& logprobs);

}  // namespace rlaif::kernels
