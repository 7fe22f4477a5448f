// MLX affine quantization (docs/FORMATS.md has the spec and its sources): per group of `group_size` inputs,
// w ≈ scale·q + bias with q unsigned `bits`-bit integers packed little-endian into uint32 words. The ops here
// quantize, dequantize and multiply by quantized weights; CPU references (plain loops, the spec) and dispatchers.
#pragma once

#include <ATen/ATen.h>

#include "kernels/cpu/registry.h"

namespace rlaif::kernels {

// Packed words per row of `in_features` values.
int64_t quant_packed_cols(int64_t in_features, int64_t bits);
// Bits 4 or 8, group_size ≥ 8 dividing `in_features` and a multiple of 32/bits; checked with RLAIF_CHECK.
void check_quant_params(int64_t in_features, int64_t bits, int64_t group_size);

// Checks a packed weight for op `op`: wq a contiguous uint32/int32 [O, K·bits/32], scales and biases contiguous
// float [O, K/group_size] of one dtype on wq's device, the parameters as check_quant_params.
void check_quant_packed(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases, int64_t bits,
                        int64_t group_size, const char* op);

// w [O, K] float32/bfloat16/float16 → wq [O, K·bits/32] uint32 (or int32, same bits), scales and biases
// [O, K/group_size] float32/bfloat16/float16 (their dtype is the format's "model dtype"). All contiguous.
void quantize_affine(const at::Tensor& w, int64_t bits, int64_t group_size, const at::Tensor& wq,
                     const at::Tensor& scales, const at::Tensor& biases);
// out [O, K] (any of the three float dtypes) = scale·q + bias, in float32 then rounded to out's dtype.
void dequantize_affine(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases, int64_t bits,
                       int64_t group_size, const at::Tensor& out);
// x [N, K] float32/bfloat16 (last dim contiguous) → out [N, O] contiguous, x's dtype: x · dequant(W)ᵀ with the
// dequantized weights and the sums in float32. On CUDA above 8 rows the weights are rounded to x's dtype first
// (the tensor-core paths: quant_linear_mma, or dequantize + cuBLAS).
void quant_linear(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                  int64_t bits, int64_t group_size, const at::Tensor& out);

// The tensor-core path for more rows (CUDA: mma.sync on W dequantized in registers, K split across blocks when the
// output tiles alone would not fill the GPU; quant_linear takes it for more than 8 bfloat16 rows when the shapes
// fit, docs/KERNELS.md): quant_linear with W rounded to bfloat16 after dequantization, as the dequantize + cuBLAS
// path rounds it, and float32 sums. x and out bfloat16, K % 64 == 0, group_size % 16 == 0. On the CPU: W
// dequantized to bfloat16, then x · Wᵀ in float32.
void quant_linear_mma(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                      int64_t bits, int64_t group_size, const at::Tensor& out);

void quantize_affine_cpu(const at::Tensor& w, int64_t bits, int64_t group_size, const at::Tensor& wq,
                         const at::Tensor& scales, const at::Tensor& biases);
void dequantize_affine_cpu(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases, int64_t bits,
                           int64_t group_size, const at::Tensor& out);
void quant_linear_cpu(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                      int64_t bits, int64_t group_size, const at::Tensor& out);

}  // namespace rlaif::kernels
