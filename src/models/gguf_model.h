// Llama-architecture GGUF files (llama.cpp / ollama models) as a DecoderModel: config from the GGUF metadata,
// tensors dequantized to the compute dtype, and Q/K rows permuted back from llama.cpp's interleaved rotary layout.
#pragma once

#include <filesystem>
#include <memory>

#include "core/gguf.h"
#include "models/decoder.h"

namespace rlaif {

ModelConfig gguf_model_config(const GgufFile& gguf);
std::shared_ptr<DecoderModel> load_gguf_model(const std::filesystem::path& path, const LoadOptions& opt = {});
// Loads a model from an HF folder or a .gguf file.
std::shared_ptr<DecoderModel> load_model(const std::filesystem::path& path, const LoadOptions& opt = {});

}  // namespace rlaif
