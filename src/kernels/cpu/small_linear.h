// Projections for a few rows (the decode step at small batch): the weights are streamed once for all rows, the
// q/k/v projections share one launch, the input's RMSNorm, the residual add and SwiGLU's silu·up are fused in.
// Numerics of the at::linear calls they replace (models/layers.h): float32 accumulation, rounded to the dtype where
// ATen rounds.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "kernels/cpu/registry.h"

namespace rlaif::kernels {

// The most rows these kernels take; larger batches go to cuBLAS GEMMs, which are then efficient.
constexpr int64_t kSmallLinearMaxRows = 8;

// An RMSNorm applied to x first (kernels/cpu/rms_norm.h, the layer's input or post-attention norm): the
// projections then read rms_norm(x, weight, eps) — on the GPU computed by every block into shared memory, so the
// norm needs no launch of its own. `normed` [N, K] (optional) receives the normalised input (for LoRA).
// Undefined weight: no norm. x [N, K] takes at most kSmallLinearNormMaxBytes with a norm.
struct InputNorm {
  at::Tensor weight;  // [K]
  double eps = 0.0;
  at::Tensor normed;
};
constexpr int64_t kSmallLinearNormMaxBytes = 160 * 1024;
// Checks `norm` against x for op `op` (an undefined weight passes).
void check_input_norm(const at::Tensor& x, const InputNorm& norm, const char* op);
// The CPU references' input: x, or rms_norm(x) (kernels/cpu/rms_norm.h; also written to norm.normed).
at::Tensor normed_input_cpu(const at::Tensor& x, const InputNorm& norm);

// outs[i] [N, O_i] = to(x [N, K] · weights[i] [O_i, K]ᵀ + biases[i]) for up to 3 weights sharing x (undefined
// bias: none), as at::linear rounds (once). With `residual` [N, O] (one weight only; may alias outs[0]):
// out = to(residual + to(x·Wᵀ + b)), as `h + linear(x)` rounds. x, weights, outs contiguous, one dtype
// (float32/bfloat16), one device; N ≤ kSmallLinearMaxRows. With `norm`, x is replaced by rms_norm(x) first.
void small_linear(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
                  const at::Tensor& residual, const std::vector<at::Tensor>& outs, const InputNorm& norm = {});
void small_linear_cpu(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                      const std::vector<at::Tensor>& biases, const at::Tensor& residual,
                      const std::vector<at::Tensor>& outs, const InputNorm& norm = {});

// out [N, F] = silu_mul(to(x·W_gateᵀ), to(x·W_upᵀ)) (kernels/cpu/silu_mul.h's roundings): SwiGLU's two
// projections and its gate in one pass, no bias; with `norm`, of rms_norm(x).
void small_linear_silu_mul(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& out,
                           const InputNorm& norm = {});
void small_linear_silu_mul_cpu(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                               const at::Tensor& out, const InputNorm& norm = {});

}  // namespace rlaif::kernels
