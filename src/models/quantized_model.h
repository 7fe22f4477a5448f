// Whole-model quantization: quantize a model's weights the way mlx_lm does, re-quantize live weights into existing
// packed buffers, merge LoRA adapters, and write an MLX-format folder (rlaif convert; docs/FORMATS.md).
#pragma once

#include <ATen/ATen.h>

#include <filesystem>
#include <functional>
#include <memory>

#include <nlohmann/json.hpp>

#include "models/decoder.h"
#include "models/quantized.h"

namespace rlaif {

// Quantizes every projection and the embedding (and an untied head) whose input dim the group size divides,
// after casting to `dtype` (scales and biases are stored in it). Projections drop their plain tensor; the
// embedding/head keep a dequantized copy in `dtype` (see ModelWeights::embed_q).
void quantize_model_weights(ModelWeights& w, const ModelConfig& c, const QuantSpec& spec, at::ScalarType dtype);
// The inverse: every quantized weight back to a plain tensor in `dtype`.
void dequantize_model_weights(ModelWeights& w, at::ScalarType dtype);
// Live re-quantization: quantizes `src`'s plain weights into the packed buffers `dst` already holds (same
// shapes, parameters and device; no allocation). Returns how many matrices were re-quantized.
int64_t requantize_weights(ModelWeights& dst, const ModelWeights& src);
// W ← W + scale·B·A for every attached adapter (in float32), then detaches the adapters.
void merge_lora(DecoderModel& model);

// config.json for a model whose source has none (GGUF): the fields transformers' Llama/Qwen2 configs read.
nlohmann::json hf_config_json(const ModelConfig& c);

// A conversion source: the model (float32 on the CPU), the config.json to extend, and the folder whose
// tokenizer files are copied (empty for GGUF).
struct ConvertSource {
  std::shared_ptr<DecoderModel> model;
  nlohmann::json config;
  std::filesystem::path files_dir;
  std::string kind;  // "hf", "gguf", "checkpoint"
};
// SRC: an HF folder (sharded or not, possibly MLX-quantized), a .gguf file, or an rlaif checkpoint directory
// (trainer_state.json names the base model; its PEFT adapter is merged, or its full model.safetensors used).
// `keep_quantization`: an MLX-quantized folder keeps its packed weights, and a GGUF file its Q8_0/Q4_0/Q4_1
// tensors repacked losslessly (LoadOptions::keep_gguf_quantization); otherwise, and always for a checkpoint (its
// weights are merged into plain tensors), the model is dequantized to float32.
ConvertSource load_convert_source(const std::filesystem::path& src, bool keep_quantization = false);

struct ConvertStats {
  int64_t tensors = 0, quantized = 0, bytes = 0;
  std::vector<std::string> copied_files;
};
// Writes DST/model.safetensors (HF names; quantized modules as MLX triples), DST/config.json with the
// quantization keys, and the tokenizer/chat-template files. `progress(done, total)` after each tensor.
// Weights the source already holds quantized are written as they are (not re-quantized), their scales and
// biases in float16 where that is exact (always for GGUF's fp16 d and m), else in their own dtype; a module
// whose bits/group differ from the most common ones gets its own config["quantization"][module] entry.
// Plain weights are quantized with `spec` when it is enabled.
ConvertStats write_mlx_folder(const ConvertSource& src, const std::filesystem::path& out, const QuantSpec& spec,
                              at::ScalarType dtype, const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace rlaif
