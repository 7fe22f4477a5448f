// Few-row projections with MLX affine-quantized weights (the quantized engine's decode step at small batch): the
// mirror of kernels/cpu/small_linear.h for packed weights — q/k/v in one launch, the input's RMSNorm, the residual
// add and SwiGLU's silu·up fused in — with quant_linear's numerics (kernels/cpu/quant.h): W dequantized in float32,
// float32 sums, the result rounded once to x's dtype, a bias then added as `y + bias` adds it.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "kernels/cpu/small_linear.h"

namespace rlaif::kernels {

// One packed weight: words [O, K·bits/32] (uint32 held as int32), scales and biases [O, K/group_size] (float32,
// bfloat16 or float16), contiguous, on one device (kernels/cpu/quant.h's layout).
struct QuantMatrix {
  at::Tensor wq, scales, biases;
  int64_t bits = 0;
  int64_t group_size = 0;
  int64_t rows() const { return wq.size(0); }
};

// Shared memory the CUDA kernel stages its input in: N·K float32 values and a sum per 128/bits values, with N
// rounded up to 1, 2, 4 or 8; the ops take inputs whose staging fits kQuantSmallLinearStageMaxBytes.
constexpr int64_t kQuantSmallLinearStageMaxBytes = 96 * 1024;
int64_t quant_small_linear_stage_bytes(int64_t rows, int64_t in_features, int64_t bits);
bool quant_small_linear_fits(int64_t rows, int64_t in_features, int64_t bits);
// Whether the ops take weight `w` for `rows` input rows: the staging fits, whole 16-byte chunks of packed words lie
// in one group, a power of two of them per group (MLX's group sizes 32, 64, 128 all do), and the words are
// contiguous with 16-byte aligned rows. The ops require it of every weight.
bool quant_small_linear_takes(const QuantMatrix& w, int64_t rows);

// outs[i] [N, O_i] = to(x · dequant(W_i)ᵀ), then + biases[i] (undefined: none) as `y + bias` rounds, for up to 3
// weights sharing x [N, K]. With `residual` [N, O] (one weight only; may alias outs[0]): out = to(residual + y).
// With `norm`, x is replaced by rms_norm(x) first (kernels/cpu/small_linear.h InputNorm). x and outs contiguous,
// float32 or bfloat16, one device, x (and the norm's weight and normed) 16-byte aligned;
// quant_small_linear_takes(W_i, N) for every weight.
void quant_small_linear(const at::Tensor& x, const std::vector<QuantMatrix>& weights,
                        const std::vector<at::Tensor>& biases, const at::Tensor& residual,
                        const std::vector<at::Tensor>& outs, const InputNorm& norm = {});
void quant_small_linear_cpu(const at::Tensor& x, const std::vector<QuantMatrix>& weights,
                            const std::vector<at::Tensor>& biases, const at::Tensor& residual,
                            const std::vector<at::Tensor>& outs, const InputNorm& norm = {});

// out [N, F] = silu_mul(to(x·dequant(W_gate)ᵀ), to(x·dequant(W_up)ᵀ)) with kernels/cpu/silu_mul.h's roundings.
void quant_small_linear_silu_mul(const at::Tensor& x, const QuantMatrix& gate, const QuantMatrix& up,
                                 const at::Tensor& out, const InputNorm& norm = {});
void quant_small_linear_silu_mul_cpu(const at::Tensor& x, const QuantMatrix& gate, const QuantMatrix& up,
                                     const at::Tensor& out, const InputNorm& norm = {});

}  // namespace rlaif::kernels
