// A weight matrix kept in MLX's affine-quantized form (docs/FORMATS.md): packed uint32 words plus per-group scales
// and biases, as MLX and mlx-community checkpoints store them. Projections compute on it directly
// (kernels::quant_linear); nothing is dequantized at load.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include <nlohmann/json.hpp>

namespace rlaif {

// bits 0 = not quantized.
struct QuantSpec {
  int64_t bits = 0;
  int64_t group_size = 64;
  bool enabled() const { return bits > 0; }
};

struct QuantizedTensor {
  at::Tensor wq;              // [out, in·bits/32] the uint32 words, held as int32 (ATen's uint32 lacks ops)
  at::Tensor scales, biases;  // [out, in/group_size], the model dtype (float32/bfloat16/float16)
  int64_t bits = 0;
  int64_t group_size = 0;

  bool defined() const { return wq.defined(); }
  int64_t out_features() const { return wq.size(0); }
  int64_t in_features() const { return wq.size(1) * 32 / bits; }
  at::Device device() const { return wq.device(); }
  // The whole matrix [out, in] in `dtype` (a temporary: tests, conversion, the autograd path).
  at::Tensor dequantize(at::ScalarType dtype) const;
  // Rows `ids` (any shape) dequantized: the embedding lookup, [..., in] in `dtype`.
  at::Tensor rows(const at::Tensor& ids, at::ScalarType dtype) const;
  QuantizedTensor to(at::Device device) const;
};

// mlx_lm's rule: a Linear/Embedding is quantized only when its input dim is a multiple of the group size.
bool quantizable(int64_t in_features, const QuantSpec& spec);
// Quantizes w [out, in] (any float dtype, any device) with scales/biases in `scale_dtype`.
QuantizedTensor quantize_weight(const at::Tensor& w, const QuantSpec& spec, at::ScalarType scale_dtype);
// Re-quantizes `w` into q's existing buffers (same shape and parameters): live re-quantization, no allocation.
void requantize_into(QuantizedTensor& q, const at::Tensor& w);
// x [..., in] · dequant(W)ᵀ + bias → [..., out] in x's dtype. Differentiable in x (backward through a
// dequantized temporary) when x requires grad.
at::Tensor quant_linear(const at::Tensor& x, const QuantizedTensor& q, const at::Tensor& bias = {});

// config.json's "quantization" (MLX) or "quantization_config" (the HF-tree copy) as written by mlx_lm; nullopt
// when neither is there. Errors name the key in `source`.
std::optional<QuantSpec> quantization_from_config(const nlohmann::json& config, const std::string& source);
// Per-module override (mlx_lm writes config["quantization"]["<module path>"] = {bits, group_size} or false).
QuantSpec quantization_for(const nlohmann::json& config, const std::string& module_path, const QuantSpec& global);

}  // namespace rlaif
