// Token sampling without a sort, for the decode step's common case (temperature only, or greedy): one pass for
// the max, one for the sums, a scan over tile sums to find the drawn token. It runs inside the CUDA graph, so a
// decode step needs no host round trip between the logits and the token. Filters (top-k/p, min-p, penalties)
// stay in engine/sampler.cpp.
#pragma once

#include <ATen/ATen.h>

#include "kernels/cpu/registry.h"

namespace rlaif::kernels {

// One token per row of logits [S, V] (float32/bfloat16, last dim contiguous, any row stride).
// temperature [S] float32: ≤ 0 is greedy (argmax, the first index on ties); otherwise the token is drawn from
// softmax(logits / T) by inverse CDF in vocabulary order with uniform [S] float64 in [0, 1): the first token whose
// cumulative probability exceeds u (p_i ∝ exp(x_i − max x), x = float(logit) / T, float32 exp, float64 sums).
// tokens [S] int64; logprobs [S, 2] float32: the token's log-prob under softmax(logits) (the raw model
// distribution) and under softmax(logits / T) (the processed one; equal to raw for greedy rows).
void sample(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& uniform,
            const at::Tensor& tokens, const at::Tensor& logprobs);
void sample_cpu(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& uniform,
                const at::Tensor& tokens, const at::Tensor& logprobs);

}  // namespace rlaif::kernels
