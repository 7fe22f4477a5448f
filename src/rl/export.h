// Merged-model export: LoRA folded into the base weights (W + scale·B·A) and written as an HF folder
// (model.safetensors with HF names, config.json, tokenizer files), so tools without PEFT can load a checkpoint.
#pragma once

#include <filesystem>

#include "models/decoder.h"

namespace rlaif {

// Writes `dir`/model.safetensors + config.json (+ tokenizer/generation files copied when the bundle came from an
// HF folder; a GGUF source gets a config.json built from its metadata and no tokenizer files, which is logged).
// Weights keep the base model's dtype. Quantized (MLX) base weights cannot be merged: an Error says so.
// `source` is where the model was loaded from (an HF folder or a .gguf file).
void save_merged_model(const DecoderModel& model, const std::filesystem::path& source, const std::filesystem::path& dir);

}  // namespace rlaif
