// LoRA's update in the decode step as two launches per group of projections sharing an input (q/k/v, gate/up,
// o, down) instead of six ATen ops per projection: shrink (x·Aᵀ for every adapter of the group) and expand
// (·Bᵀ, scaled, added to the base output, optionally to the residual too). Numerics of layers::project: the input
// cast to the adapter dtype (float32), the update rounded to the output dtype, then added.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "kernels/cpu/registry.h"

namespace rlaif::kernels {

// t [S, Σ r_i] float32 = to_float(x [S, D]) · [A_1; A_2; …]ᵀ, A_i [r_i, D] float32 contiguous; x float32/bfloat16.
void lora_shrink(const at::Tensor& x, const std::vector<at::Tensor>& a, const at::Tensor& t);
void lora_shrink_cpu(const at::Tensor& x, const std::vector<at::Tensor>& a, const at::Tensor& t);

// For adapter i (columns of t in order): outs_i = to(y_i + to(scale_i · t_i · B_iᵀ)), B_i [O_i, r_i] float32;
// t [S, Σ r_i] float32 (lora_shrink's) or of the outputs' dtype (x·Aᵀ columns of a base GEMM), rows of any stride;
// y_i and outs_i [S, O_i] of the activation dtype with contiguous rows, any row stride (column slices of one
// packed GEMM's output; outs_i may alias y_i). With `residual` [S, O] (one adapter
// only; outs_0 may alias it): outs_0 = to(residual + to(y_0 + to(scale_0 · t · B_0ᵀ))) — `h + project(x)`.
void lora_expand(const at::Tensor& t, const std::vector<at::Tensor>& b, const std::vector<double>& scales,
                 const std::vector<at::Tensor>& ys, const at::Tensor& residual, const std::vector<at::Tensor>& outs);
void lora_expand_cpu(const at::Tensor& t, const std::vector<at::Tensor>& b, const std::vector<double>& scales,
                     const std::vector<at::Tensor>& ys, const at::Tensor& residual, const std::vector<at::Tensor>& outs);

// SwiGLU over gate and up with their adapters' updates (b = {B_gate, B_up}, t's columns in that order):
// out [S, F] contiguous = silu_mul(lora_expand(gate), lora_expand(up)) with both ops' rounding — the gate/up expand
// and silu_mul in one launch on the GPU. gate and up [S, F] of any row stride (halves of one packed output).
void lora_expand_silu_mul(const at::Tensor& t, const std::vector<at::Tensor>& b, const std::vector<double>& scales,
                          const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out);
void lora_expand_silu_mul_cpu(const at::Tensor& t, const std::vector<at::Tensor>& b,
                              const std::vector<double>& scales, const at::Tensor& gate, const at::Tensor& up,
                              const at::Tensor& out);

// One adapter's update added to the residual, then the next RMSNorm, in one launch on the GPU (the o and down
// projections' expand with the post-attention or next input norm after it): h = to(h + to(y + to(scale · t · Bᵀ)))
// in place, then out = rms_norm(h, w, eps) (kernels/cpu/rms_norm.h's roundings). t [S, r] float32 or of h's dtype
// (rows of any stride), B [O, r] float32 contiguous, y [S, O] with contiguous rows (any stride), h and out [S, O]
// contiguous, w [O]. lora_expand_rms_norm_takes: whether the CUDA kernel serves these tensors (r ≤ 256; rows of y,
// h, w and out 16-byte aligned), which the engine asks before it defers an update to the norm.
constexpr int64_t kLoraNormMaxRank = 256;
bool lora_expand_rms_norm_takes(const at::Tensor& t, const at::Tensor& b, const at::Tensor& y, const at::Tensor& h);
void lora_expand_rms_norm(const at::Tensor& t, const at::Tensor& b, double scale, const at::Tensor& y,
                          const at::Tensor& h, const at::Tensor& w, double eps, const at::Tensor& out);
void lora_expand_rms_norm_cpu(const at::Tensor& t, const at::Tensor& b, double scale, const at::Tensor& y,
                              const at::Tensor& h, const at::Tensor& w, double eps, const at::Tensor& out);

}  // namespace rlaif::kernels
